//! The parameter list of every kernel, as launchers must push their arguments.
//!
//! A launch whose arguments differ in number, order or kind from its kernel's signature reads
//! garbage on a GPU; the CUDA backend compares what it pushes with [`signature`] before every
//! launch, and this module's test compares the table with the sources.

/// What a pointer points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// The kernel's element type (`T`: f32, f16 or bf16).
    T,
    /// `float`.
    F32,
    /// `int`.
    I32,
    /// `pm_i64` (64-bit).
    I64,
}

/// One kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A pointer; `true` when the kernel may write through it.
    Ptr(Elem, bool),
    /// `int`.
    Int,
    /// `pm_i64`.
    Long,
    /// `float`.
    Float,
}

use Elem::{F32, I32, I64, T};
use Param::{Float, Int, Long, Ptr};

const SIGNATURES: &[(&str, &[Param])] = &[
    ("embedding", &[Ptr(T, true), Ptr(T, false), Ptr(I32, false), Int]),
    ("rms_norm", &[Ptr(T, true), Ptr(T, false), Ptr(T, false), Float, Int]),
    ("fused_add_rms_norm", &[Ptr(T, true), Ptr(T, true), Ptr(T, false), Ptr(T, false), Float, Int]),
    ("rope", &[Ptr(T, true), Ptr(T, true), Ptr(I32, false), Ptr(F32, false), Int, Int, Int]),
    ("silu_mul", &[Ptr(T, true), Ptr(T, false), Ptr(T, false), Long]),
    ("add_bias", &[Ptr(T, true), Ptr(T, false), Int, Long]),
    ("reshape_and_cache", &[Ptr(T, false), Ptr(T, false), Ptr(T, true), Ptr(T, true), Ptr(I64, false), Int, Int, Int]),
    ("copy_blocks", &[Ptr(T, true), Ptr(T, true), Ptr(I32, false), Long]),
    (
        "paged_attention_decode",
        &[
            Ptr(F32, true),
            Ptr(F32, true),
            Ptr(F32, true),
            Ptr(T, false),
            Ptr(I32, false),
            Ptr(T, false),
            Ptr(T, false),
            Ptr(I32, false),
            Int,
            Ptr(I32, false),
            Int,
            Int,
            Int,
            Int,
            Float,
        ],
    ),
    (
        "paged_attention_reduce",
        &[
            Ptr(T, true),
            Ptr(F32, false),
            Ptr(F32, false),
            Ptr(F32, false),
            Ptr(I32, false),
            Ptr(I32, false),
            Int,
            Int,
            Int,
        ],
    ),
    (
        "paged_attention_prefill",
        &[
            Ptr(T, true),
            Ptr(T, false),
            Ptr(T, false),
            Ptr(T, false),
            Ptr(I32, false),
            Int,
            Ptr(I32, false),
            Int,
            Int,
            Int,
            Int,
            Float,
        ],
    ),
];

/// The parameters of a kernel (by its name without the dtype suffix).
pub fn signature(kernel: &str) -> Option<&'static [Param]> {
    SIGNATURES.iter().find(|(name, _)| *name == kernel).map(|(_, params)| *params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SOURCES;

    fn parse_param(text: &str) -> Param {
        let text = text.trim();
        let (ty, _name) = text.rsplit_once(' ').expect("a type and a name");
        let ty = ty.trim();
        let (base, pointer) = match ty.strip_suffix('*') {
            Some(b) => (b.trim(), true),
            None => (ty, false),
        };
        let (base, constant) = match base.strip_prefix("const ") {
            Some(b) => (b.trim(), true),
            None => (base, false),
        };
        let elem = |b: &str| match b {
            "T" => T,
            "float" => F32,
            "int" => I32,
            "pm_i64" => I64,
            other => panic!("unknown element type {other}"),
        };
        match (pointer, base) {
            (true, b) => Ptr(elem(b), !constant),
            (false, "int") => Int,
            (false, "pm_i64") => Long,
            (false, "float") => Float,
            (false, other) => panic!("unknown parameter type {other}"),
        }
    }

    #[test]
    fn the_table_matches_every_kernel_source() {
        let mut seen = 0;
        for source in SOURCES {
            let text = source.text.replace("\\\n", " ");
            for kernel in source.kernels {
                let head = format!("{kernel}_##S(");
                let start = text.find(&head).unwrap_or_else(|| panic!("{kernel} in {}", source.file)) + head.len();
                let end = start + text[start..].find(')').expect("closing parenthesis");
                let params: Vec<Param> = text[start..end].split(',').map(parse_param).collect();
                assert_eq!(Some(params.as_slice()), signature(kernel), "{kernel}");
                seen += 1;
            }
        }
        assert_eq!(seen, SIGNATURES.len());
    }
}

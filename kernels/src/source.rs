//! The kernel sources, for NVRTC.

/// `cuda/common.cuh`: element types, conversions, constants and reductions.
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// One source file and the kernels it defines (without their dtype suffix).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `cuda/`.
    pub file: &'static str,
    /// Its text, which includes `common.cuh`.
    pub text: &'static str,
    /// Kernels, each defined once per [`Dtype`](crate::Dtype) as `<name>_<suffix>`.
    pub kernels: &'static [&'static str],
}

/// Every kernel source.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "attention.cu",
        text: include_str!("../cuda/attention.cu"),
        kernels: &["paged_attention_decode", "paged_attention_reduce", "paged_attention_prefill"],
    },
    KernelSource {
        file: "cache.cu",
        text: include_str!("../cuda/cache.cu"),
        kernels: &["reshape_and_cache", "copy_blocks"],
    },
    KernelSource {
        file: "layers.cu",
        text: include_str!("../cuda/layers.cu"),
        kernels: &["embedding", "rms_norm", "fused_add_rms_norm", "rope", "silu_mul", "add_bias"],
    },
];

impl KernelSource {
    /// The source as one translation unit: `common.cuh` pasted in place of its include, so
    /// that NVRTC needs only CUDA's own headers (`cuda_fp16.h`, `cuda_bf16.h`).
    pub fn translation_unit(&self) -> String {
        self.text.replace("#include \"common.cuh\"", COMMON)
    }

    /// Names of the kernels this source defines for `dtype`.
    pub fn kernel_names(&self, dtype: crate::Dtype) -> Vec<String> {
        self.kernels.iter().map(|k| format!("{k}_{}", dtype.suffix())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_by_its_source() {
        for source in SOURCES {
            let unit = source.translation_unit();
            assert!(!unit.contains("#include \"common.cuh\""));
            for kernel in source.kernels {
                assert!(unit.contains(&format!("{kernel}_##S(")), "{kernel} in {}", source.file);
            }
        }
    }
}

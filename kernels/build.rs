//! Builds the CUDA kernel sources as host C++ through the SIMT emulation harness
//! (`emu/simt.h`), exposing the `pm_emu_*` launch wrappers of `emu/launch.cpp` and the
//! harness's own test kernels (`emu/harness_test.cpp`).

fn main() {
    for path in [
        "emu/simt.h",
        "emu/launch.cpp",
        "emu/harness_test.cpp",
        "cuda/common.cuh",
        "cuda/attention.cu",
        "cuda/cache.cu",
        "cuda/layers.cu",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("emu/launch.cpp")
        .file("emu/harness_test.cpp")
        .include("emu")
        .opt_level(2)
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(true)
        .compile("pagemesh_kernels_emu");
}

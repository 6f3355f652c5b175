#!/usr/bin/env python3
"""Compile check of the CUDA kernels, without a GPU.

Compiles every kernel source (cuda/*.cu, with common.cuh pasted in, exactly the translation
unit the executor hands to NVRTC) to PTX through NVRTC for compute_80 and compute_90, then
assembles the PTX with ptxas for sm_80 and sm_90. Fails on any compile error or warning, and on
any kernel that spills registers. Writes the per-kernel register, shared-memory, stack and
spill report to docs/kernels.md (or the path given with --report).

Needs the PyPI wheels nvidia-cuda-nvrtc-cu12 (libnvrtc), nvidia-cuda-runtime-cu12
(cuda_fp16.h, cuda_bf16.h) and nvidia-cuda-nvcc-cu12 (ptxas), installed in the Python that
runs this script.
"""

import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["attention.cu", "cache.cu", "layers.cu"]
TARGETS = [("compute_80", "sm_80"), ("compute_90", "sm_90")]


def package_dir(name):
    """Directory of an installed nvidia.* wheel package."""
    import importlib

    module = importlib.import_module(name)
    paths = list(getattr(module, "__path__", []))
    if not paths:
        raise SystemExit(f"{name} is not installed")
    return paths[0]


def load_nvrtc():
    lib_dir = os.path.join(package_dir("nvidia.cuda_nvrtc"), "lib")
    for builtins in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so.*"))):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    candidates = [p for p in glob.glob(os.path.join(lib_dir, "libnvrtc.so*")) if ".alt." not in p]
    if not candidates:
        raise SystemExit(f"no libnvrtc in {lib_dir}")
    lib = ctypes.CDLL(sorted(candidates)[0])
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return lib, f"{major.value}.{minor.value}"


def translation_unit(name):
    with open(os.path.join(HERE, "cuda", "common.cuh")) as f:
        common = f.read()
    with open(os.path.join(HERE, "cuda", name)) as f:
        text = f.read()
    return text.replace('#include "common.cuh"', common)


def nvrtc_compile(lib, name, source, arch, include):
    """PTX of one source for one virtual architecture, and NVRTC's log."""
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
    # The options the executor compiles with at start-up (gpu/cuda.rs).
    opts = [f"--gpu-architecture={arch}", f"--include-path={include}", "--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    result = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    log = log.value.decode(errors="replace").strip()
    ptx = None
    if result == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetPTX(prog, buf))
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if result != 0:
        err = lib.nvrtcGetErrorString(result).decode()
        raise CompileError(f"{name} for {arch}: NVRTC failed ({err}):\n{log}")
    return ptx, log


class CompileError(Exception):
    pass


def check(lib, result):
    if result != 0:
        raise CompileError(f"NVRTC: {lib.nvrtcGetErrorString(result).decode()}")


ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?(?:.*?(\d+) bytes smem)?")


def ptxas(ptxas_bin, ptx, sm):
    """ptxas -v over one PTX file: {kernel: {registers, smem, stack, spill_stores, spill_loads}}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [ptxas_bin, "-v", "--warn-on-spills", f"--gpu-name={sm}", "-o", os.path.join(tmp, "k.cubin"), path],
            capture_output=True,
            text=True,
        )
    out = run.stdout + run.stderr
    if run.returncode != 0:
        raise CompileError(f"ptxas {sm} failed:\n{out}")
    warnings = [line for line in out.splitlines() if "warning" in line.lower()]
    kernels = {}
    current = None
    for line in out.splitlines():
        m = ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = FRAME.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels, warnings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=os.path.join(HERE, "..", "docs", "kernels.md"))
    args = parser.parse_args()
    started = time.time()
    lib, version = load_nvrtc()
    include = os.path.join(package_dir("nvidia.cuda_runtime"), "include")
    ptxas_bin = os.path.join(package_dir("nvidia.cuda_nvcc"), "bin", "ptxas")
    ptxas_version = subprocess.run([ptxas_bin, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"NVRTC {version}; {ptxas_version}")
    rows = []
    failures = []
    for name in SOURCES:
        source = translation_unit(name)
        for arch, sm in TARGETS:
            try:
                ptx, log = nvrtc_compile(lib, name, source, arch, include)
                if log:
                    failures.append(f"{name} {arch}: NVRTC log:\n{log}")
                kernels, warnings = ptxas(ptxas_bin, ptx, sm)
            except CompileError as e:
                failures.append(str(e))
                continue
            failures.extend(f"{name} {sm}: {w}" for w in warnings)
            if not kernels:
                failures.append(f"{name} {sm}: ptxas reported no kernels")
            for kernel, info in sorted(kernels.items()):
                rows.append((name, kernel, sm, info))
                if info["spill_stores"] or info["spill_loads"]:
                    failures.append(f"{kernel} {sm}: spills {info['spill_stores']} B stores, {info['spill_loads']} B loads")
                print(
                    f"{sm} {kernel:34} {info['registers']:3} registers {info['smem']:6} B smem "
                    f"{info['stack']:4} B stack {info['spill_stores']} B spill stores {info['spill_loads']} B spill loads"
                )
    elapsed = time.time() - started
    write_report(args.report, rows, version, ptxas_version)
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(f"{len(rows)} kernel builds ({len(rows) // len(TARGETS)} kernels x {len(TARGETS)} architectures), 0 spill bytes, {elapsed:.1f} s")
    return 0


def write_report(path, rows, version, ptxas_version):
    lines = [
        "# Kernel resource report",
        "",
        "Written by `kernels/check.py` (run by `.ci/run`): every kernel of `kernels/cuda/` compiled",
        f"through NVRTC {version} to PTX for compute_80 and compute_90, then assembled by ptxas for",
        f"sm_80 and sm_90 ({ptxas_version}). The check fails on any compile error or warning",
        "and on any spill. Registers are per thread; shared memory is static, per block. A stack",
        "frame without spills is local memory the code asks for (rope: the slow path of sinf/cosf",
        "range reduction for large angles).",
        "",
        "| source | kernel | arch | registers | shared memory (B) | stack (B) | spill stores (B) | spill loads (B) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, kernel, sm, info in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        lines.append(
            f"| {name} | `{kernel}` | {sm} | {info['registers']} | {info['smem']} | {info['stack']} | "
            f"{info['spill_stores']} | {info['spill_loads']} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

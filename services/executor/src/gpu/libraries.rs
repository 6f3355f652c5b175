//! Finding CUDA's libraries (cuBLAS, cuBLASLt, NVRTC) of CUDA 13 or 12, where the system's
//! library path does not already hold them.
//!
//! cudarc opens each library by its plain name (`libcublas.so.13`, then `libcublas.so.12`, ...),
//! which the dynamic loader resolves through `LD_LIBRARY_PATH` and the system cache. Libraries
//! installed elsewhere — a Python environment's `nvidia/*/lib`, a toolkit outside the cache, a
//! directory given with `--cuda-lib-dir` / `PAGEMESH_CUDA_LIB_DIR` — are opened here first, by
//! full path; the loader then matches cudarc's plain name against the already loaded library's
//! own name (its SONAME), so cudarc gets the one found here.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CUDA major versions whose libraries pagemesh takes, newest first.
pub const CUDA_MAJORS: [u32; 2] = [13, 12];

/// A library the GPU backend needs besides the driver, by stem (`cublas` → `libcublas.so.13`).
/// Order matters: each is opened after the ones it links against.
const LIBRARIES: [&str; 3] = ["cublasLt", "cublas", "nvrtc"];

/// Where the environment variable naming extra library directories is read from.
pub const LIB_DIR_ENV: &str = "PAGEMESH_CUDA_LIB_DIR";

/// The libraries opened here, kept open for the life of the process.
static OPENED: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();

/// Directories to look in, in order: `explicit` (from `--cuda-lib-dir`), `PAGEMESH_CUDA_LIB_DIR`
/// (colon-separated), `$CUDA_HOME/lib64`, the usual toolkit paths, and the `nvidia/*/lib`
/// directories of the active Python environment (`$VIRTUAL_ENV`) and of `python3`'s
/// site-packages under `/usr` and `/opt`.
pub fn search_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if let Some(list) = std::env::var_os(LIB_DIR_ENV) {
        dirs.extend(std::env::split_paths(&list));
    }
    for home in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(home) {
            dirs.push(Path::new(&h).join("lib64"));
            dirs.push(Path::new(&h).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    let mut roots: Vec<PathBuf> = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).into_iter().collect();
    roots.extend(children("/opt").into_iter().map(|d| d.join(".venv")));
    roots.push("/usr/local".into());
    roots.push("/usr".into());
    for root in roots {
        for lib in ["lib", "lib64"] {
            for python in children(root.join(lib)) {
                for packages in ["site-packages", "dist-packages"] {
                    dirs.extend(nvidia_lib_dirs(&python.join(packages).join("nvidia")));
                }
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// The sub-directories of `dir` (none when it cannot be read), sorted.
fn children(dir: impl AsRef<Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// `nvidia/<package>/lib` of the CUDA 12 wheels and `nvidia/cu13/lib` of the CUDA 13 ones.
fn nvidia_lib_dirs(nvidia: &Path) -> Vec<PathBuf> {
    children(nvidia).into_iter().map(|p| p.join("lib")).filter(|p| p.is_dir()).collect()
}

/// The file of library `stem` in `dir`, of the newest CUDA major present.
fn library_in(dir: &Path, stem: &str) -> Option<PathBuf> {
    CUDA_MAJORS.iter().map(|m| dir.join(format!("lib{stem}.so.{m}"))).find(|p| p.is_file())
}

/// Whether the dynamic loader finds library `stem` by its plain name already.
fn on_loader_path(stem: &str) -> bool {
    CUDA_MAJORS.iter().any(|m| {
        // SAFETY: opening a CUDA library runs its initialisers only, as cudarc would.
        unsafe { libloading::Library::new(format!("lib{stem}.so.{m}")) }.is_ok()
    })
}

/// Opens (once per process) every library the loader does not already find, from the first of
/// [`search_dirs`] that holds it. Returns the files opened here, or an error naming what was
/// looked for and where.
pub fn open_cuda_libraries(explicit: Option<&Path>) -> Result<Vec<PathBuf>, String> {
    OPENED.get_or_init(|| open_all(explicit)).clone()
}

fn open_all(explicit: Option<&Path>) -> Result<Vec<PathBuf>, String> {
    let dirs = search_dirs(explicit);
    let mut opened = Vec::new();
    for stem in LIBRARIES {
        if explicit.is_none() && on_loader_path(stem) {
            continue;
        }
        let Some(file) = dirs.iter().find_map(|d| library_in(d, stem)) else {
            if on_loader_path(stem) {
                continue;
            }
            let names: Vec<String> = CUDA_MAJORS.iter().map(|m| format!("lib{stem}.so.{m}")).collect();
            let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(format!(
                "--device cuda: {} not found on the loader's path (LD_LIBRARY_PATH, the system cache) nor in [{}]; \
                 install CUDA 13 or 12 (the toolkit, or the nvidia-cublas / nvidia-cuda-nvrtc wheels) and point \
                 --cuda-lib-dir or {LIB_DIR_ENV} at the directory holding it",
                names.join(" or "),
                searched.join(", ")
            ));
        };
        if stem == "nvrtc" {
            open_builtins(&file)?;
        }
        open_file(&file)?;
        opened.push(file);
    }
    Ok(opened)
}

/// NVRTC opens its `libnvrtc-builtins.so.<major>.<minor>` at compile time; open the one beside
/// it first, so that NVRTC finds it whatever the loader's path.
fn open_builtins(nvrtc: &Path) -> Result<(), String> {
    let Some(dir) = nvrtc.parent() else { return Ok(()) };
    let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
                })
                .collect()
        })
        .unwrap_or_default();
    builtins.sort();
    match builtins.last() {
        Some(file) => open_file(file),
        None => Ok(()),
    }
}

/// Opens `file` and keeps it open for the life of the process.
fn open_file(file: &Path) -> Result<(), String> {
    // SAFETY: opening a CUDA library runs its initialisers only, as cudarc would.
    let library = unsafe { libloading::Library::new(file) }
        .map_err(|e| format!("--device cuda: cannot open {}: {e}", file.display()))?;
    std::mem::forget(library);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_is_found_in_a_given_directory_by_its_newest_major() {
        let dir = std::env::temp_dir().join(format!("pagemesh-cudalibs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert_eq!(library_in(&dir, "cublas"), None);
        std::fs::write(dir.join("libcublas.so.12"), b"").expect("write");
        assert_eq!(library_in(&dir, "cublas"), Some(dir.join("libcublas.so.12")));
        std::fs::write(dir.join("libcublas.so.13"), b"").expect("write");
        assert_eq!(library_in(&dir, "cublas"), Some(dir.join("libcublas.so.13")));
        assert_eq!(search_dirs(Some(&dir)).first(), Some(&dir), "an explicit directory is searched first");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn python_wheel_layouts_are_searched() {
        let root = std::env::temp_dir().join(format!("pagemesh-wheels-{}", std::process::id()));
        let cu13 = root.join("cu13/lib");
        let cu12 = root.join("cublas/lib");
        std::fs::create_dir_all(&cu13).expect("dir");
        std::fs::create_dir_all(&cu12).expect("dir");
        assert_eq!(nvidia_lib_dirs(&root), vec![cu13, cu12], "sorted by name");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_missing_library_names_what_was_looked_for_and_where() {
        let dir = std::env::temp_dir().join(format!("pagemesh-nolibs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // Without CUDA on this machine the explicit directory is empty and nothing is found;
        // with CUDA installed the libraries may be found elsewhere, which is not an error.
        if let Err(e) = open_all(Some(&dir)) {
            assert!(e.contains("libcublasLt.so.13 or libcublasLt.so.12"), "{e}");
            assert!(e.contains(&dir.display().to_string()), "{e}");
            assert!(e.contains("--cuda-lib-dir"), "{e}");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

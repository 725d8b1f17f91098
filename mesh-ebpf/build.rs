//! Rebuild the programs when bpf-linker changes (a new linker can change the
//! object even when no source did).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

//! Packing benchmarks. (Owned by the packing work.)
pub fn run(_args: &[String]) -> i32 {
    eprintln!("not implemented yet");
    1
}

//! Allocator benchmarks. (Owned by the allocator work.)
pub fn run(_cmd: &str, _args: &[String]) -> i32 {
    eprintln!("not implemented yet");
    1
}

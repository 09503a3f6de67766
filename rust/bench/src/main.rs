//! exl2rs-bench: standalone benchmarks of exl2rs-core. Subcommands live in their own modules.
mod alloc;
mod pack;

fn usage() -> ! {
    eprintln!(
        "usage: exl2rs-bench <alloc|frontier|anneal|pack> [options]\n  run a subcommand with --help for its options"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let rest = &args[1..];
    let code = match cmd.as_str() {
        "alloc" | "frontier" | "anneal" => alloc::run(cmd, rest),
        "pack" => pack::run(rest),
        _ => usage(),
    };
    std::process::exit(code)
}

//! sync_worker: tails pg_sync's action log over logical replication and fans it out.
//! This is the skeleton the worker issue builds on; today it only answers --help and --version.

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-V") => println!("sync_worker {}", env!("CARGO_PKG_VERSION")),
        _ => {
            println!(
                "sync_worker {}\n\nUsage: sync_worker [--help] [--version]\n\n\
                 Replication, sequencing and client fan-out are not built yet; see the project's issues.",
                env!("CARGO_PKG_VERSION")
            );
            if arg.is_some_and(|a| a != "--help" && a != "-h") {
                std::process::exit(2);
            }
        }
    }
}

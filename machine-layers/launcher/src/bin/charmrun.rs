//! `charmrun`: starts the processes of a charmrs job on this host. See the
//! `charmrs_launcher` crate docs for options, environment and exit status.

fn main() {
    std::process::exit(charmrs_launcher::main_with_args(
        std::env::args_os().skip(1),
    ));
}

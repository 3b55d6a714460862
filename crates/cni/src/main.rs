//! meshless-cni: run by the container runtime with CNI_COMMAND and the
//! network config on stdin; prints the result or the error object on
//! stdout (exit 1 on error), as the CNI spec requires.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, reason = "CNI results go to stdout")]

use std::process::ExitCode;

fn main() -> ExitCode {
    let lookup = |var: &str| std::env::var(var).ok();
    match meshless_cni::run(&lookup, &mut std::io::stdin().lock()) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(failure) => {
            println!("{}", failure.to_json());
            ExitCode::FAILURE
        }
    }
}

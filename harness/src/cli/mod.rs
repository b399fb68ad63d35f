//! The command line: its flags ([`args`]) and one function per command ([`commands`]).

pub mod args;
pub mod commands;

//! `kloset completion bash|zsh|fish` and `kloset man [DIR]`, generated from the clap
//! definitions, so they always match the binary.
//!
//! Man pages: `kloset.1` (global flags and the top-level commands), `kloset-at.1` (the verbs),
//! one `kloset-VERB.1` per verb of `at` (`kloset-backup.1`, `kloset-archive.1`, …) and one
//! `kloset-COMMAND.1` per other top-level command (`kloset-store.1`, `kloset-pkg.1`, …); verbs
//! and top-level commands have distinct names, so the one flat namespace is enough. Without
//! DIR, `kloset.1` is printed to stdout (`kloset man | man -l -`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, ValueEnum};

use super::{Cli, exit};

#[derive(Parser, Debug)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

#[derive(Parser, Debug)]
pub struct ManArgs {
    /// Directory to write every page into (created if missing); without it, kloset(1) is
    /// printed to stdout.
    pub dir: Option<PathBuf>,
}

pub fn completion(a: CompletionArgs) -> anyhow::Result<i32> {
    let shell = match a.shell {
        ShellArg::Bash => clap_complete::Shell::Bash,
        ShellArg::Zsh => clap_complete::Shell::Zsh,
        ShellArg::Fish => clap_complete::Shell::Fish,
    };
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kloset", &mut buf);
    super::stdout_write(&buf)?;
    Ok(exit::OK)
}

/// Every man page: (file name, roff text).
pub fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut top = Cli::command();
    top.build();
    let mut out = vec![("kloset.1".to_string(), render(top.clone())?)];
    for sub in top.get_subcommands() {
        let name = sub.get_name().to_string();
        if name == "help" {
            continue;
        }
        if name == "at" {
            let at = sub
                .clone()
                .display_name("kloset-at")
                .bin_name("kloset at STORE");
            out.push(("kloset-at.1".into(), render(at)?));
            for verb in sub.get_subcommands() {
                let v = verb.get_name().to_string();
                if v == "help" {
                    continue;
                }
                let page = verb
                    .clone()
                    .display_name(format!("kloset-{v}"))
                    .bin_name(format!("kloset at STORE {v}"));
                out.push((format!("kloset-{v}.1"), render(page)?));
            }
            continue;
        }
        let page = sub
            .clone()
            .display_name(format!("kloset-{name}"))
            .bin_name(format!("kloset {name}"));
        out.push((format!("kloset-{name}.1"), render(page)?));
    }
    Ok(out)
}

fn render(cmd: clap::Command) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .manual("kloset manual")
        .source(format!("kloset {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)
        .context("rendering a man page")?;
    Ok(buf)
}

pub fn man(a: ManArgs) -> anyhow::Result<i32> {
    let pages = pages()?;
    let Some(dir) = a.dir else {
        let (_, text) = &pages[0];
        super::stdout_write(text)?;
        return Ok(exit::OK);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in &pages {
        write_file(&dir.join(name), text)?;
    }
    eprintln!("wrote {} man pages to {}", pages.len(), dir.display());
    Ok(exit::OK)
}

fn write_file(p: &Path, text: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
    f.write_all(text)
        .with_context(|| format!("writing {}", p.display()))
}

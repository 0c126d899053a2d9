//! `wgtrain devices` and `wgtrain selftest` as a user runs them.
use std::process::Command;

fn wgtrain(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .args(args)
        .output()
        .expect("run wgtrain")
}

#[test]
fn devices_lists_an_adapter_with_backend_and_limits() {
    let out = wgtrain(&["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[0] "), "{text}");
    assert!(text.contains("backend "), "{text}");
    assert!(text.contains("max storage binding"), "{text}");
}

#[test]
fn selftest_passes_every_kernel_and_prints_the_table() {
    let out = wgtrain(&["selftest"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("max error"), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn selftest_passes_with_a_64_kib_binding_limit() {
    let out = Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .arg("selftest")
        .env("WGTRAIN_MAX_BINDING", "65536")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_backend_and_device_are_clear_errors() {
    let out = wgtrain(&["selftest", "--backend", "glide"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown backend 'glide'"), "{err}");
    let out = wgtrain(&["selftest", "--device", "no-such-card"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no adapter name contains 'no-such-card'"),
        "{err}"
    );
}

/// Without XDG_RUNTIME_DIR (headless machines, CI) Mesa's Wayland probe printed
/// "error: XDG_RUNTIME_DIR is invalid or not set": a successful command shows no "error:".
#[test]
fn no_spurious_error_without_xdg_runtime_dir() {
    let out = Command::new(env!("CARGO_BIN_EXE_wgtrain"))
        .arg("devices")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("error:"), "{err}");
}

/// `wgtrain devices` numbers exactly the adapters `--device N` chooses from.
#[test]
fn devices_and_device_flag_share_one_numbering() {
    let out = wgtrain(&["devices"]);
    let listed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('['))
        .count();
    assert!(listed > 0);
    let out = wgtrain(&["selftest", "--device", &listed.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "device {listed} does not exist ({listed} adapters"
        )),
        "{err}"
    );
}

//! The control socket against a real (tiny) guest: a CPL3 spin loop on
//! KVM, paused, resumed, queried and shut down over the unix socket.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::Kvm;
use schema::vmm::{Request, Response, VmState, call, write_frame};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::regs::EntryMode;
use vmm::builder::{Machine, MachineConfig};
use vmm::control::{ControlServer, VmController};
use vmm::vstate::exit::ExitReason;

fn state(s: &mut UnixStream) -> (VmState, u64) {
    match call(s, Request::GetState).expect("get state") {
        Response::State {
            state,
            vcpus,
            memory_mib,
            uptime_ms,
        } => {
            assert_eq!((vcpus, memory_mib), (1, 8));
            (state, uptime_ms)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pause_resume_state_and_shutdown_over_the_control_socket() {
    const TEST: &str = "pause_resume_state_and_shutdown_over_the_control_socket";
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => return eprintln!("SKIP {TEST}: cannot open /dev/kvm ({e})"),
    };
    let m = Machine::new(&kvm, MachineConfig::new(1, 8 << 20), Box::new(io::sink())).expect("vm");
    // inc rcx; jmp -5
    m.memory
        .write_slice(&[0x48, 0xff, 0xc1, 0xeb, 0xfb], GuestAddress(0x10_0000))
        .expect("payload");
    let vcpus = m
        .create_vcpus(GuestAddress(0x10_0000), EntryMode::User)
        .expect("vcpus");
    let handles = vcpus
        .into_iter()
        .map(|v| v.start().expect("start"))
        .collect();
    let ctrl = Arc::new(VmController::new(handles, 8, m.exit.clone()));
    let dir = std::env::temp_dir().join(format!("smctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path: PathBuf = dir.join("control.sock");
    let server = ControlServer::spawn(&path, ctrl.clone()).expect("server");
    assert!(
        ControlServer::spawn(&path, ctrl.clone()).is_err(),
        "path in use"
    );
    let runner = {
        let ctrl = ctrl.clone();
        std::thread::spawn(move || ctrl.run_until_exit())
    };

    let mut s = UnixStream::connect(&path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(state(&mut s).0, VmState::Running);
    assert_eq!(call(&mut s, Request::Pause).unwrap(), Response::Ok);
    assert_eq!(state(&mut s).0, VmState::Paused);
    assert_eq!(call(&mut s, Request::Resume).unwrap(), Response::Ok);
    let (st, uptime) = state(&mut s);
    assert_eq!(st, VmState::Running);
    assert!(uptime < 60_000);

    // Another protocol version: refused by name, the connection goes on.
    write_frame(
        &mut s,
        &serde_json::json!({"version": 99, "request": {"type": "get_state"}}),
    )
    .unwrap();
    let resp: schema::vmm::ResponseFrame = schema::vmm::read_frame(&mut s).unwrap();
    match resp.response {
        Response::Error { message } => assert!(message.contains("version 99"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(state(&mut s).0, VmState::Running);

    // Connections are served one at a time.
    drop(s);
    // An oversize frame: an error, then the server closes the connection.
    let mut big = UnixStream::connect(&path).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    big.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    let resp: schema::vmm::ResponseFrame = schema::vmm::read_frame(&mut big).unwrap();
    assert!(matches!(resp.response, Response::Error { .. }));
    drop(big);

    let mut s = UnixStream::connect(&path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(call(&mut s, Request::Shutdown).unwrap(), Response::Ok);
    let reason = runner.join().expect("runner").expect("exit");
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(state(&mut s).0, VmState::ShuttingDown);
    drop(s);
    drop(server);
    assert!(!path.exists(), "socket removed");
    let _ = std::fs::remove_dir_all(&dir);
}

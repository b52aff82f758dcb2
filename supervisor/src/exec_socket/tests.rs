use std::ffi::OsString;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

use carapace_sandbox::fds::passing;
use carapace_sandbox::namespaces::{HostIds, RunAs};

use super::server::read_request;
use super::*;

fn request() -> RunRequest {
    let dir = std::env::temp_dir();
    run_request(
        &[OsString::from("true"), OsString::from_vec(vec![0xff, b'x'])],
        &dir,
        &dir,
        [(OsString::from("K"), OsString::from_vec(vec![0xfe]))].into_iter(),
        RunAs::Fixed(HostIds {
            uid: 1500,
            gid: 1501,
        }),
    )
    .unwrap()
}

#[test]
fn a_request_keeps_bytes_that_are_not_utf8_and_the_identities() {
    let r = request();
    assert_eq!(r.command[1], vec![0xff, b'x']);
    assert_eq!(r.env, vec![(b"K".to_vec(), vec![0xfe])]);
    assert_eq!(r.run_as, Some((1500, 1501)));
    assert_eq!(r.cwd_id, file_id(&std::env::temp_dir()).unwrap());
    let back: ToSupervisor =
        serde_json::from_slice(&serde_json::to_vec(&ToSupervisor::Run(r.clone())).unwrap())
            .unwrap();
    assert_eq!(back, ToSupervisor::Run(r));
}

#[test]
fn a_request_for_a_missing_directory_fails_so_the_caller_runs_it_itself() {
    let missing = std::path::Path::new("/nonexistent-carapace-dir");
    let e = run_request(
        &[OsString::from("true")],
        missing,
        missing,
        std::iter::empty(),
        RunAs::Auto,
    );
    assert!(e.is_err());
}

#[test]
fn unknown_messages_and_fields_are_refused() {
    assert!(serde_json::from_str::<ToSupervisor>(r#"{"answer":{"allow":true}}"#).is_ok());
    assert!(serde_json::from_str::<ToSupervisor>(r#"{"answer":{"allow":true,"x":1}}"#).is_err());
    assert!(serde_json::from_str::<ToSupervisor>(r#"{"launch":{}}"#).is_err());
    let exited = ToClient::Exited {
        code: 7,
        line: "carapace: exit=7".into(),
        note: None,
        report: serde_json::json!({"exit_code": 7}),
    };
    let back: ToClient = serde_json::from_slice(&serde_json::to_vec(&exited).unwrap()).unwrap();
    assert_eq!(back, exited);
}

#[test]
fn a_run_comes_with_exactly_three_descriptors() {
    let (a, b) = carapace_broker::protocol::seqpacket_pair().unwrap();
    let bytes = serde_json::to_vec(&ToSupervisor::Run(request())).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_raw_fd();
    passing::send(a.as_fd(), &bytes, &[fd, fd, fd]).unwrap();
    let (got, stdio) = read_request(&b, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(got, request());
    assert_eq!(stdio.len(), 3);

    passing::send(a.as_fd(), &bytes, &[fd]).unwrap();
    match read_request(&b, std::time::Duration::from_secs(5)) {
        Err(ToClient::Failed { message, .. }) => {
            assert!(message.contains("1 descriptors instead of 3"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    passing::send(a.as_fd(), br#"{"answer":{"allow":true}}"#, &[fd, fd, fd]).unwrap();
    match read_request(&b, std::time::Duration::from_secs(5)) {
        Err(ToClient::Failed { message, .. }) => {
            assert!(message.contains("expected a run"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    passing::send(a.as_fd(), b"not json", &[]).unwrap();
    assert!(matches!(
        read_request(&b, std::time::Duration::from_secs(5)),
        Err(ToClient::Failed { .. })
    ));
}

#[test]
fn binding_replaces_a_stale_socket_refuses_anything_else_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(EXEC_SOCKET);
    // A stale socket (nobody listens): replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = ExecServer::bind(&path).unwrap();
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert!(ExecClient::connect(&path).is_ok());
    drop(server);
    assert!(!path.exists(), "the socket is removed with the server");

    std::fs::write(&path, "x").unwrap();
    assert!(ExecServer::bind(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
}

#[test]
fn no_socket_is_not_running_rather_than_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = ExecClient::connect(&dir.path().join(EXEC_SOCKET)).unwrap_err();
    assert!(matches!(e, ConnectError::NotRunning { .. }), "{e}");
    assert_eq!(
        socket_beside(std::path::Path::new("/run/carapace/control.sock")),
        std::path::PathBuf::from("/run/carapace/exec.sock")
    );
}

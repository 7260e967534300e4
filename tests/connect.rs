//! Connecting: bad URIs, nothing listening and wrong credentials fail clearly and promptly.

mod common;

use std::time::{Duration, Instant};

use kiwimq::{ErrorKind, Settings};

#[actix_rt::test]
async fn an_unknown_scheme_is_a_config_error() {
    let error = kiwimq::connect("ftp://127.0.0.1").await.unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Config(_)), "{error}");
}

#[actix_rt::test]
async fn nothing_listening_is_a_connection_error_within_the_timeout() {
    let started = Instant::now();
    let error = Settings::new("amqp://guest:guest@127.0.0.1:1/%2f")
        .with_connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::Connection(_) | ErrorKind::Timeout),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[actix_rt::test]
async fn wrong_credentials_are_a_connection_error_that_hides_the_password() {
    let url = common::amqp_url().replacen("guest:guest", "guest:not-the-password", 1);
    let error = Settings::new(url)
        .with_connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");
}

#[actix_rt::test]
async fn an_unknown_vhost_is_a_connection_error() {
    let url = format!("{}-no-such-vhost", common::amqp_url());
    let error = Settings::new(url).connect().await.unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");
}

#[actix_rt::test]
async fn a_failed_connect_leaves_no_thread_behind() {
    let before = common::communicator_threads();
    for _ in 0..20 {
        kiwimq::connect("ftp://127.0.0.1").await.unwrap_err();
        let _ = Settings::new("amqp://guest:guest@127.0.0.1:1/%2f")
            .connect()
            .await
            .unwrap_err();
    }
    // Other tests of this file may hold a runtime or two at the same moment; a leak would
    // leave forty. Stopped runtimes take a moment to end their threads.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::communicator_threads() >= before + 8 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        common::communicator_threads() < before + 8,
        "runtime threads leaked: {before} -> {}",
        common::communicator_threads()
    );
}

/// kiwiPy's URI forms mean the default vhost: `…:5672/` and `amqp://host/` (its own
/// examples), as `%2f` does.
#[actix_rt::test]
async fn kiwipys_uri_forms_connect_to_the_default_vhost() {
    let url = common::amqp_url();
    let Some(base) = url.strip_suffix("/%2f") else {
        return; // KIWIMQ_URL names another vhost: nothing to compare with
    };
    let without_port = base
        .rsplit_once(':')
        .map_or(base, |(host, _)| host)
        .to_owned();
    let mut forms = vec![format!("{base}/"), base.to_owned()];
    if base.ends_with(":5672") {
        forms.push(format!("{without_port}/"));
    }
    for uri in forms {
        let comm = common::amqp_settings(&uri)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert!(comm.is_connected(), "{uri}");
        comm.close().await.unwrap();
    }
}

/// `amqps://` must never connect in plaintext: what a listener receives first is a TLS
/// hello, and a peer that answers with AMQP (a plain port) fails the connect, the password
/// hidden in the error.
#[actix_rt::test]
async fn amqps_sends_a_tls_hello_never_plaintext() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut bytes = [0u8; 8];
        let read = socket.read(&mut bytes).await.unwrap();
        // Answer as a plain AMQP broker would: its protocol header.
        let _ = socket.write_all(b"AMQP\0\0\x09\x01").await;
        bytes[..read].to_vec()
    });
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?verify=verify_none");
    let error = Settings::new(url)
        .with_connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_err();
    let first = first_bytes.await.unwrap();
    assert_eq!(
        first.first(),
        Some(&0x16),
        "a TLS handshake record, not {first:?}"
    );
    assert!(!first.starts_with(b"AMQP"), "no plaintext AMQP header");
    assert!(
        matches!(error.kind(), ErrorKind::Connection(_) | ErrorKind::Timeout),
        "{error}"
    );
    assert!(
        !error.to_string().contains(":guest@"),
        "the password is hidden: {error}"
    );
}

/// A server that is not an AMQP broker (here one answering as HTTP) is named as such, not
/// reported as a parser's internals.
#[actix_rt::test]
async fn a_server_that_does_not_speak_amqp_is_named_plainly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut bytes = [0u8; 8];
            let _ = socket.read(&mut bytes).await;
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let error = Settings::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
        .with_connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains(&format!(
            "the server on 127.0.0.1:{port} did not answer as an AMQP broker"
        )),
        "{text}"
    );
    assert!(!text.contains("ParserErrors"), "{text}");
}

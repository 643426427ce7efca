//! The server serving HTTPS and WSS itself (`[tls]`), with a certificate the
//! test makes (rcgen) for 127.0.0.1 and localhost: two Peers converge
//! through it, one over https (SSE) and one over wss, trusting the
//! certificate through `with_root_certificates`; a client that does not
//! trust it cannot connect, and a plain-HTTP client gets nothing.

mod support;

use anyhow::{Context, Result};
use crsync_node_server::{Server, TlsConfig};
use crsync_peer::{Dialer, SiteId, TransportError};
use crsync_transports::sse::SseDialer;
use crsync_transports::tls::RootCertificates;
use crsync_transports::ws::WebSocketDialer;
use support::{ENV, client_store, contents, insert, peer, wait_until};

/// A self-signed certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
fn certificate() -> Result<(String, String)> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
    Ok((made.cert.pem(), made.signing_key.serialize_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_over_https_and_wss_with_a_generated_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = certificate()?;
    std::fs::write(dir.path().join("cert.pem"), &cert)?;
    std::fs::write(dir.path().join("key.pem"), &key)?;
    let mut config = support::config(&dir);
    config.tls = Some(TlsConfig::new(
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    ));
    let server = Server::bind_with_auth(config, support::auth()).await?;
    assert!(server.is_tls());
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));

    let roots = RootCertificates::from_pem(cert.as_bytes())?;
    let https = format!("https://{addr}/db/notes");
    let wss = format!("wss://{addr}/db/notes/ws");

    // Nobody gets in without trusting the certificate, nor over plain HTTP.
    let me = SiteId::from_bytes([7; 16]);
    let untrusted = SseDialer::new(&https).with_token(ENV).dial(me).await;
    assert!(
        matches!(untrusted, Err(TransportError::Connect { .. })),
        "{untrusted:?}"
    );
    let untrusted = WebSocketDialer::new(&wss).with_token(ENV).dial(me).await;
    assert!(
        matches!(untrusted, Err(TransportError::Connect { .. })),
        "{untrusted:?}"
    );
    let plain = SseDialer::new(format!("http://{addr}/db/notes"))
        .with_token(ENV)
        .with_dial_timeout(std::time::Duration::from_secs(5))
        .dial(me)
        .await;
    assert!(plain.is_err(), "plain HTTP on a TLS port: {plain:?}");

    let a = peer(client_store(&dir.path().join("a.db")).await?);
    let b = peer(client_store(&dir.path().join("b.db")).await?);
    insert(a.store(), 1, "over https").await?;
    insert(b.store(), 2, "over wss").await?;
    a.add_dialer(
        SseDialer::new(&https)
            .with_token(ENV)
            .with_root_certificates(roots.clone()),
    );
    b.add_dialer(
        WebSocketDialer::new(&wss)
            .with_token(ENV)
            .with_root_certificates(roots),
    );
    insert(a.store(), 100, "a again").await?;
    let want = vec![
        "todo 1 Some(\"over https\")".to_string(),
        "todo 2 Some(\"over wss\")".to_string(),
        "todo 100 Some(\"a again\")".to_string(),
    ];
    for p in [&a, &b] {
        let store = p.store().clone();
        let want = want.clone();
        wait_until(p, "both rows on both sides", move || {
            let store = store.clone();
            let want = want.clone();
            async move { Ok(contents(&store).await? == want) }
        })
        .await?;
    }
    a.shutdown().await;
    b.shutdown().await;
    let _ = stop.send(());
    tokio::time::timeout(support::TIMEOUT, served)
        .await
        .context("serve did not return")???;
    Ok(())
}

#[tokio::test]
async fn a_bad_certificate_or_key_is_a_clear_startup_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, _) = certificate()?;
    let (_, other_key) = certificate()?;
    std::fs::write(dir.path().join("cert.pem"), &cert)?;
    std::fs::write(dir.path().join("other.pem"), &other_key)?;
    let start = |cert: &str, key: &str| {
        let mut config = support::config(&dir);
        config.tls = Some(TlsConfig::new(dir.path().join(cert), dir.path().join(key)));
        Server::bind_with_auth(config, support::auth())
    };
    let missing = start("cert.pem", "nope.pem")
        .await
        .expect_err("no key file");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let mismatched = start("cert.pem", "other.pem").await.expect_err("wrong key");
    assert!(
        mismatched.to_string().contains("do not make a usable pair"),
        "{mismatched}"
    );
    Ok(())
}

//! TLS, mutual TLS and API keys on every plane, against real processes: `switchyard certs`
//! makes the certificates, `serve`, `worker`, `coordinator` and a real etcd use them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{
    certs, four_layers_eight_experts, http, http_address, model, offline, request, serve, BIN,
};
use serde_json::Value;
use switchyard_net::grpc::worker_client;
use switchyard_net::tls::{client_config, Connector};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::ClientConfig;
use tonic::transport::{Channel, Endpoint};

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn arg(dir: &Path, name: &str) -> String {
    file(dir, name).to_str().unwrap().to_string()
}

/// The cluster identity flags for the certificates in `dir`.
fn cluster_flags(dir: &Path) -> Vec<String> {
    let mut flags = Vec::new();
    for (flag, name) in [
        ("--cluster-ca", "ca.pem"),
        ("--cluster-cert", "node.pem"),
        ("--cluster-key", "node.key"),
    ] {
        flags.extend([flag.to_string(), arg(dir, name)]);
    }
    flags
}

/// A TLS client trusting `ca`'s CA, presenting `dir/name.pem` when `identity` names one.
fn tls_client(ca: &Path, identity: Option<(&Path, &str)>) -> Arc<ClientConfig> {
    let files = identity.map(|(d, n)| (file(d, &format!("{n}.pem")), file(d, &format!("{n}.key"))));
    client_config(
        &file(ca, "ca.pem"),
        files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .unwrap()
}

async fn channel(
    address: &str,
    tls: Option<Arc<ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    let e = Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    match tls {
        Some(c) => e.connect_with_connector(Connector(c)).await,
        None => e.connect().await,
    }
}

/// Generates over gRPC: the token ids, or the status code of the failure (a refused
/// connection is `Unavailable`).
async fn generate(
    address: &str,
    tls: Option<Arc<ClientConfig>>,
    key: Option<&str>,
    prompt: &[u32],
    max_tokens: u32,
) -> Result<Vec<u32>, tonic::Code> {
    let Ok(ch) = channel(address, tls).await else {
        return Err(tonic::Code::Unavailable);
    };
    let mut r = tonic::Request::new(request(prompt, max_tokens));
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = InferenceClient::new(ch)
        .generate(r)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.map_err(|s| s.code())? {
        ids.extend(m.token_ids);
    }
    Ok(ids)
}

/// One HTTP/1.1 GET over TLS: the status code and body, and the certificate the server
/// presented; an error if the handshake failed.
async fn https_get(
    address: &str,
    tls: Arc<ClientConfig>,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String, CertificateDer<'static>)> {
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let cert = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Ok((code, body.to_string(), cert))
}

fn pem_der(path: &Path) -> CertificateDer<'static> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).unwrap()
}

#[test]
fn a_tls_and_mtls_serve_generates_and_refuses_strangers() {
    let (dir, ca, other) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    model(dir.path(), "tiny-mixtral", four_layers_eight_experts);
    certs(ca.path());
    certs(other.path());
    let c = ca.path();
    let (cert, key, client_ca) = (arg(c, "server.pem"), arg(c, "server.key"), arg(c, "ca.pem"));
    let mut args = vec![
        "--model",
        dir.path().to_str().unwrap(),
        // Two shards: the expert exchange between the workers runs over mutual TLS too.
        "--grid",
        "1x2",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ];
    let cluster = cluster_flags(c);
    args.extend(cluster.iter().map(String::as_str));
    let server = serve(&args);
    let prompt = [1, 17, 93, 5, 250, 44];
    let want = offline(dir.path(), &[(prompt.to_vec(), 12)], None).remove(0);
    let rt = common::runtime();
    rt.block_on(async {
        let trusted = tls_client(c, Some((c, "client")));
        let ids = generate(&server.address, Some(trusted.clone()), None, &prompt, 12).await;
        assert_eq!(ids, Ok(want.token_ids.clone()), "over TLS + mTLS");

        // A plain client, a client without a certificate, and one whose certificate another
        // CA signed: all refused.
        assert!(generate(&server.address, None, None, &prompt, 1)
            .await
            .is_err());
        let anonymous = tls_client(c, None);
        assert!(
            generate(&server.address, Some(anonymous.clone()), None, &prompt, 1)
                .await
                .is_err()
        );
        let stranger = tls_client(c, Some((other.path(), "client")));
        assert!(
            generate(&server.address, Some(stranger.clone()), None, &prompt, 1)
                .await
                .is_err()
        );
        // A client that does not trust this server's CA refuses it, too.
        let wrong_ca = tls_client(other.path(), Some((c, "client")));
        assert!(generate(&server.address, Some(wrong_ca), None, &prompt, 1)
            .await
            .is_err());

        // The HTTP port: the same.
        let web = http_address(&server);
        let (code, body, _) = https_get(&web, trusted.clone(), "/v1/models", "")
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(https_get(&web, anonymous, "/health", "").await.is_err());
        assert!(https_get(&web, stranger, "/health", "").await.is_err());
    });
    // Plain HTTP on the TLS port gets no HTTP answer.
    let web = http_address(&server);
    let refused = std::panic::catch_unwind(|| http(&web, "GET", "/health", ""));
    assert!(refused.is_err(), "plain HTTP answered on a TLS port");
}

#[test]
fn a_worker_refuses_callers_without_a_cluster_certificate() {
    let (ca, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certs(ca.path());
    certs(other.path());
    let c = ca.path();
    let mut args = vec![
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let cluster = cluster_flags(c);
    args.extend(cluster.iter().map(String::as_str));
    let worker = common::start(&args, "worker listening on ");
    let metrics = worker.address_after("worker metrics on ");
    let rt = common::runtime();
    rt.block_on(async {
        let stats = |tls: Option<Arc<ClientConfig>>| {
            let address = worker.address.clone();
            async move {
                let ch = channel(&address, tls).await.map_err(|e| e.to_string())?;
                worker_client(ch)
                    .stats(pb::StatsRequest {})
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        };
        assert!(stats(None).await.is_err(), "plain TCP");
        assert!(
            stats(Some(tls_client(c, None))).await.is_err(),
            "no certificate"
        );
        let stranger = tls_client(c, Some((other.path(), "node")));
        assert!(
            stats(Some(stranger)).await.is_err(),
            "another CA's certificate"
        );
        // A member's certificate gets in.
        let member = tls_client(c, Some((c, "node")));
        stats(Some(member.clone())).await.unwrap();

        // The metrics port is on the cluster plane too: HTTPS, for members only.
        let (code, body, _) = https_get(&metrics, member, "/metrics", "").await.unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("switchyard_worker_ready"), "{body}");
        assert!(https_get(&metrics, tls_client(c, None), "/metrics", "")
            .await
            .is_err());
        let stranger = tls_client(c, Some((other.path(), "node")));
        assert!(https_get(&metrics, stranger, "/metrics", "").await.is_err());
    });
    let plain = std::panic::catch_unwind(|| http(&metrics, "GET", "/metrics", ""));
    assert!(
        plain.is_err(),
        "plain HTTP answered on the worker's TLS metrics port"
    );

    // A coordinator without the cluster identity cannot bring the worker up.
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mistral", |_| {});
    let out = common::output_within(
        Command::new(BIN).args([
            "coordinator",
            "--model",
            dir.path().to_str().unwrap(),
            "--workers",
            &worker.address,
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "a coordinator without a cluster certificate started"
    );
}

#[test]
fn api_keys_guard_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mistral", |_| {});
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# the team's key\nsk-from-file\n\n").unwrap();
    let server = serve(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--api-key",
        "sk-flag",
        "--api-key-file",
        keys.to_str().unwrap(),
        "--api-key-rate-limit",
        "10/s",
    ]);
    let web = http_address(&server);
    let get = |auth: Option<&str>| {
        let headers: Vec<(&str, String)> = auth
            .map(|a| ("Authorization", a.to_string()))
            .into_iter()
            .collect();
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::http_with_headers(&web, "GET", "/v1/models", &h, "")
    };
    for (auth, want) in [
        (None, 401),
        (Some("Bearer sk-wrong"), 401),
        (Some("sk-flag"), 401),
        (Some("Bearer sk-flag"), 200),
        (Some("Bearer sk-from-file"), 200),
    ] {
        let (code, body) = get(auth);
        assert_eq!(code, want, "{auth:?}: {body}");
        if code == 401 {
            let e: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(e["error"]["type"], "invalid_request_error", "{body}");
            assert!(
                e["error"]["message"].as_str().unwrap().contains("API key"),
                "{body}"
            );
        }
    }
    // Health, readiness and metrics stay open.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(http(&web, "GET", path, "").0, 200, "{path}");
    }
    let rt = common::runtime();
    rt.block_on(async {
        let a = &server.address;
        let code = |r: Result<Vec<u32>, tonic::Code>| r.err();
        assert_eq!(
            code(generate(a, None, None, &[1, 2], 2).await),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(generate(a, None, Some("sk-wrong"), &[1, 2], 2).await),
            Some(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            generate(a, None, Some("sk-flag"), &[1, 2], 2)
                .await
                .map(|t| t.len()),
            Ok(2)
        );
    });
    // Over its rate (10/s, bursts of 10), a key is told to wait; another key is not.
    let mut limited = None;
    for _ in 0..40 {
        let (code, body) = get(Some("Bearer sk-flag"));
        if code == 429 {
            limited = Some(body);
            break;
        }
        assert_eq!(code, 200, "{body}");
    }
    let body = limited.expect("40 requests at once passed a limit of 10/s");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error", "{body}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry after"),
        "{body}"
    );
    assert_eq!(get(Some("Bearer sk-from-file")).0, 200);
    rt.block_on(async {
        // gRPC calls draw from the same bucket.
        for _ in 0..40 {
            match generate(&server.address, None, Some("sk-flag"), &[1, 2], 2).await {
                Err(tonic::Code::ResourceExhausted) => return,
                r => assert_eq!(r.map(|t| t.len()), Ok(2)),
            }
        }
        panic!("40 gRPC calls at once passed a limit of 10/s");
    });
    // The keys never reach the log.
    let logged: Vec<String> = server
        .seen
        .iter()
        .cloned()
        .chain(server.lines.try_iter())
        .collect();
    assert!(
        logged
            .iter()
            .all(|l| !l.contains("sk-flag") && !l.contains("sk-from-file")),
        "{logged:?}"
    );
}

#[test]
fn a_rotated_certificate_serves_new_connections_while_a_stream_finishes() {
    let (dir, ca) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    model(dir.path(), "tiny-mistral", |_| {});
    let c = ca.path();
    certs(c);
    let server = serve(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--tls-cert",
        &arg(c, "server.pem"),
        "--tls-key",
        &arg(c, "server.key"),
    ]);
    let before = pem_der(&file(c, "server.pem"));
    let rt = common::runtime();
    rt.block_on(async {
        let tls = tls_client(c, None);
        let web = http_address(&server);
        let (_, _, seen) = https_get(&web, tls.clone(), "/health", "").await.unwrap();
        assert_eq!(seen, before);

        // A long stream on a connection opened before the rotation.
        let ch = channel(&server.address, Some(tls.clone())).await.unwrap();
        let mut stream = InferenceClient::new(ch)
            .generate(request(&[1, 2, 3], 2000))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let mut tokens = first.token_ids.len();

        certs(c); // new certificates under the same CA
        let after = pem_der(&file(c, "server.pem"));
        assert_ne!(after, before);
        let (code, _, seen) = https_get(&web, tls.clone(), "/health", "").await.unwrap();
        assert_eq!(
            (code, seen),
            (200, after),
            "a new connection sees the new certificate"
        );

        while let Some(m) = stream.message().await.unwrap() {
            tokens += m.token_ids.len();
        }
        assert_eq!(tokens, 2000, "the stream in flight finished");
    });
}

/// Runs `switchyard ARGS` (with `SWITCHYARD_API_KEY` = `key` when given): its status, stdout
/// and stderr.
fn own_client(args: &[String], key: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("SWITCHYARD_API_KEY");
    if let Some(k) = key {
        cmd.env("SWITCHYARD_API_KEY", k);
    }
    let out = common::output_within(&mut cmd, Duration::from_secs(120));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.success(), stdout, stderr)
}

#[test]
fn switchyards_own_clients_speak_tls_and_keys_and_a_rotated_client_ca_is_trusted() {
    let (dir, ca, other, trust) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    model(dir.path(), "tiny-mistral", |_| {});
    let (c, o) = (ca.path(), other.path());
    certs(c);
    certs(o);
    // The CA the server takes client certificates from: a file of its own, rotated below.
    let client_ca = file(trust.path(), "clients.pem");
    std::fs::copy(file(c, "ca.pem"), &client_ca).unwrap();
    let keys = file(trust.path(), "keys");
    std::fs::write(&keys, "sk-own\n").unwrap();
    let server = serve(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--tls-cert",
        &arg(c, "server.pem"),
        "--tls-key",
        &arg(c, "server.key"),
        "--tls-client-ca",
        client_ca.to_str().unwrap(),
        "--api-key-file",
        keys.to_str().unwrap(),
    ]);
    let grpc = server.address.clone();
    let web = http_address(&server);
    // Trusting c's CA for the server, presenting `who`'s client certificate.
    let access = |who: &Path| -> Vec<String> {
        [
            ("--tls-ca", arg(c, "ca.pem")),
            ("--tls-client-cert", arg(who, "client.pem")),
            ("--tls-client-key", arg(who, "client.key")),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
    };
    let with = |head: &[&str], who: &Path| -> Vec<String> {
        let mut a: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        a.extend(access(who));
        a
    };
    let prompt = [1u32, 17, 93, 5];
    let want = offline(dir.path(), &[(prompt.to_vec(), 6)], None).remove(0);
    let generate_args = |server: &str, who: &Path| {
        with(
            &[
                "generate",
                "--server",
                server,
                "--prompt-ids",
                "1,17,93,5",
                "--max-tokens",
                "6",
                "--json",
            ],
            who,
        )
    };
    let https = format!("https://{grpc}");

    // generate --server over TLS with a client certificate and the key from the environment:
    // the offline engine's tokens.
    let (ok, stdout, stderr) = own_client(&generate_args(&https, c), Some("sk-own"));
    assert!(ok, "{stderr}");
    let got: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(got["token_ids"], serde_json::json!(want.token_ids));
    // Without the key: refused, saying why.
    let (ok, _, stderr) = own_client(&generate_args(&https, c), None);
    assert!(!ok && stderr.contains("API key"), "{stderr}");
    // A plain address with --tls-ca is TLS too; http:// with it is a contradiction.
    let (ok, _, stderr) = own_client(&generate_args(&grpc, c), Some("sk-own"));
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = own_client(&generate_args(&format!("http://{grpc}"), c), None);
    assert!(!ok && stderr.contains("use https://"), "{stderr}");

    // status, the key from a file.
    let (ok, stdout, stderr) = own_client(
        &with(
            &[
                "status",
                "--server",
                &grpc,
                "--api-key-file",
                keys.to_str().unwrap(),
            ],
            c,
        ),
        None,
    );
    assert!(ok && stdout.contains("grid 1x1"), "{stdout}{stderr}");

    // bench over both APIs.
    for target in [format!("grpcs://{grpc}"), format!("https://{web}/v1")] {
        let json = file(trust.path(), "bench.json");
        let bench = with(
            &[
                "bench",
                "--target",
                &target,
                "--tokenizer",
                dir.path().to_str().unwrap(),
                "--requests",
                "3",
                "--concurrency",
                "2",
                "--input-len",
                "8",
                "--output-len",
                "4",
                "--json",
                json.to_str().unwrap(),
            ],
            c,
        );
        let (ok, _, stderr) = own_client(&bench, Some("sk-own"));
        assert!(ok, "{target}: {stderr}");
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["runs"][0]["completed"], 3, "{target}: {report}");
        assert!(
            !std::fs::read_to_string(&json).unwrap().contains("sk-own"),
            "the key reached the report"
        );
        // A TLS flag with a plain target is refused before anything connects.
        let plain = target
            .replacen("grpcs://", "grpc://", 1)
            .replacen("https://", "http://", 1);
        let bench: Vec<String> = bench
            .iter()
            .map(|a| {
                if *a == target {
                    plain.clone()
                } else {
                    a.clone()
                }
            })
            .collect();
        let (ok, _, stderr) = own_client(&bench, Some("sk-own"));
        assert!(!ok && stderr.contains("grpcs:// or https://"), "{stderr}");
    }

    // The client CA file now holds the other CA: its client certificates are in, the first
    // CA's are out, without a restart.
    std::fs::copy(file(o, "ca.pem"), &client_ca).unwrap();
    let (ok, stdout, stderr) = own_client(&generate_args(&https, o), Some("sk-own"));
    assert!(ok, "{stderr}");
    let got: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(got["token_ids"], serde_json::json!(want.token_ids));
    let (ok, _, _) = own_client(&generate_args(&https, c), Some("sk-own"));
    assert!(
        !ok,
        "a client certificate of the rotated-out CA was accepted"
    );
}

/// A real etcd serving TLS only, requiring client certificates; killed when dropped.
struct TlsEtcd {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_etcd(certs: &Path) -> TlsEtcd {
    let (client, peer) = (common::free_port(), common::free_port());
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = tempfile::tempdir().unwrap();
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(data.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .args(["--cert-file", &arg(certs, "node.pem")])
        .args(["--key-file", &arg(certs, "node.key")])
        .args([
            "--trusted-ca-file",
            &arg(certs, "ca.pem"),
            "--client-cert-auth",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start etcd; scripts/system-deps.sh installs Debian's etcd-server");
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "etcd does not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsEtcd {
        child,
        url,
        _data: data,
    }
}

/// Turns on etcd's authentication with a root user of `password` (etcdctl's `user add root`,
/// `user grant-role root root`, `auth enable`).
async fn enable_auth(url: &str, tls: Arc<ClientConfig>, password: &str) {
    use switchyard_proto::etcd::etcdserverpb as e;
    let address = url.trim_start_matches("https://");
    let mut auth = e::auth_client::AuthClient::new(channel(address, Some(tls)).await.unwrap());
    auth.user_add(e::AuthUserAddRequest {
        name: "root".into(),
        password: password.into(),
    })
    .await
    .unwrap();
    // etcd 3.4 knows the root role without adding it; a newer one may want it added.
    let _ = auth
        .role_add(e::AuthRoleAddRequest {
            name: "root".into(),
        })
        .await;
    auth.user_grant_role(e::AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(e::AuthEnableRequest {}).await.unwrap();
}

#[test]
fn a_cluster_in_etcd_over_tls_with_authentication_serves() {
    let (dir, ca) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    model(dir.path(), "tiny-mistral", |_| {});
    let c = ca.path();
    certs(c);
    let etcd = tls_etcd(c);
    let rt = common::runtime();
    rt.block_on(enable_auth(
        &etcd.url,
        tls_client(c, Some((c, "client"))),
        "hunter2",
    ));
    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "hunter2\n").unwrap();
    let access = |password_file: &Path| -> Vec<String> {
        [
            "--etcd-ca",
            &arg(c, "ca.pem"),
            "--etcd-cert",
            &arg(c, "client.pem"),
            "--etcd-key",
            &arg(c, "client.key"),
            "--etcd-user",
            "root",
            "--etcd-password-file",
            password_file.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let a = access(&password);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let _worker = common::etcd_worker(&etcd.url, "secure", &a);
    let coordinator = common::etcd_coordinator(dir.path(), &etcd.url, "secure", "1x1", &a);
    rt.block_on(async {
        // The coordinator finds the worker through etcd and serves once it is placed.
        let t = std::time::Instant::now();
        loop {
            match generate(&coordinator.address, None, None, &[5, 6, 7], 3).await {
                Ok(ids) => {
                    assert_eq!(ids.len(), 3);
                    break;
                }
                Err(code) => assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "no placement through etcd within 60 s: {code:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // The wrong password: etcd refuses the worker, which says so.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let a = access(&wrong);
    let mut args = vec![
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--cluster",
        "secure",
    ];
    args.extend(a.iter().map(String::as_str));
    let w = common::start(&args, "worker listening on ");
    let t = std::time::Instant::now();
    loop {
        match w.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains("refused user \"root\"") => break,
            Ok(_) => {}
            Err(_) => panic!("the worker never said etcd refused its user"),
        }
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

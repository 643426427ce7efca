//! Server memory under stalled clients: the RSS of a real `crsync serve`
//! child process, idle and with N clients that each open a stream, ask for
//! everything (an empty cursor) and never read, over HTTP+SSE and WebSocket.
//!
//! `cargo bench --bench limits` prints one markdown table. Every client is a
//! real socket: SSE clients send `GET {base}/stream?peerId=..` (reading only
//! the response head) and `POST {base}/sync` with an empty cursor; WebSocket
//! clients send the upgrade (reading only the `101` head), then a `connect`
//! and a `sync` frame. After that no client reads a byte. The server's
//! `VmRSS` is sampled until it stops growing; `VmHWM` is its peak.
//!
//! Environment: `CRSYNC_LIMITS_BENCH_MB` (database size, default 16; the
//! README quotes 60), `CRSYNC_LIMITS_BENCH_CLIENTS` (default 50),
//! `CRSYNC_LIMITS_BENCH_ONLY` (`sse` or `ws`), `CRSYNC_LIMITS_BENCH_ROWS_PER_TXN`
//! (rows per source transaction, default 1000 as in the sync benchmark; a
//! transaction larger than a batch goes in parts),
//! `CRSYNC_LIMITS_BENCH_BATCH_BYTES` (the server's `batch_bytes`, default
//! its own default). Without `--bench` (as under
//! `cargo test --all-targets`) it runs a smoke size in a few seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

mod common;

use common::{
    ChildProcess, ROWS_PER_TXN, close_raw, create_schema, open_raw, proc_status_kib, start_serve,
};

const TOKEN: &str = "bench-token";
const DB_NAME: &str = "bench";
/// How long RSS must stay flat (within 1%) to count as settled.
const SETTLE_FOR: Duration = Duration::from_secs(3);
/// Longest wait for RSS to settle.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// Limit on any one socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A server child process, killed when dropped.
struct ServerProcess {
    child: ChildProcess,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let (child, addr) = start_serve(
            dir,
            &format!(
                "bind = \"127.0.0.1:0\"\ndata_dir = \"data\"\ntoken_env = \"\"\n\
                 [[tokens]]\ntoken = \"{TOKEN}\"\ndatabases = [\"*\"]\n\
                 [limits]\nmax_connections = 10000\nmax_connections_per_token = 10000\n\
                 stall_timeout_secs = 3600\nrate_per_token = 0\nrate_per_database = 0\n{}",
                std::env::var("CRSYNC_LIMITS_BENCH_BATCH_BYTES")
                    .map(|b| format!("batch_bytes = {b}\n"))
                    .unwrap_or_default()
            ),
        )?;
        Ok(ServerProcess {
            child,
            addr: addr.parse()?,
        })
    }

    /// `VmRSS` and `VmHWM` in KiB.
    fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.child.0.id();
        let field = |name: &str| {
            proc_status_kib(pid, name).with_context(|| format!("no {name} in /proc status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Samples `VmRSS` until it stays within 1% for [`SETTLE_FOR`].
    fn settled_rss_kib(&self) -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut base = self.memory_kib()?.0;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.memory_kib()?.0;
            if now.abs_diff(base) * 100 > base {
                base = now;
                since = Instant::now();
            } else if since.elapsed() >= SETTLE_FOR || start.elapsed() >= SETTLE_MAX {
                return Ok(now);
            }
        }
    }
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads up to the end of an HTTP response head; returns it.
fn read_head(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(
            s.read(&mut byte)? == 1,
            "connection closed in the response head"
        );
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn peer_id(i: usize) -> String {
    format!(
        "{:032x}",
        0xbe00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128
    )
}

fn sync_json(peer: &str) -> String {
    format!(r#"{{"type":"sync","peerId":"{peer}","cursor":{{"peers":{{}}}}}}"#)
}

/// An SSE client that asks for everything and never reads after the head.
fn stalled_sse(addr: SocketAddr, i: usize) -> anyhow::Result<TcpStream> {
    let peer = peer_id(i);
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET /db/{DB_NAME}/stream?peerId={peer} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let head = read_head(&mut stream)?;
    ensure!(head.starts_with("HTTP/1.1 200"), "stream refused: {head}");
    let body = sync_json(&peer);
    let mut post = connect(addr)?;
    write!(
        post,
        "POST /db/{DB_NAME}/sync HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    post.read_to_string(&mut answer)?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "sync refused: {answer}");
    Ok(stream)
}

/// One masked client text frame.
fn ws_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A WebSocket client that asks for everything and never reads after the `101`.
fn stalled_ws(addr: SocketAddr, i: usize) -> anyhow::Result<TcpStream> {
    let peer = peer_id(i);
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET /db/{DB_NAME}/ws HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let head = read_head(&mut stream)?;
    ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    stream.write_all(&ws_frame(&format!(
        r#"{{"type":"connect","peerId":"{peer}"}}"#
    )))?;
    stream.write_all(&ws_frame(&sync_json(&peer)))?;
    Ok(stream)
}

/// Opens the database once with a client that reads its first frames and leaves.
fn warm_up(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET /db/{DB_NAME}/stream?peerId={} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n",
        peer_id(999_999)
    )?;
    let head = read_head(&mut stream)?;
    ensure!(head.starts_with("HTTP/1.1 200"), "warm-up refused: {head}");
    let mut buf = [0u8; 256];
    ensure!(stream.read(&mut buf)? > 0, "warm-up stream sent nothing");
    Ok(())
}

/// The source database: `items` rows in transactions of `per_txn` rows,
/// until the file reaches `mb` MiB.
fn write_database(path: &Path, mb: u64, per_txn: usize) -> anyhow::Result<u64> {
    let c = open_raw(path)?;
    create_schema(&c)?;
    let mut id: i64 = 0;
    loop {
        let tx = c.unchecked_transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO items VALUES (?1, ?2, ?3, ?4)")?;
            for _ in 0..per_txn {
                st.execute((
                    id,
                    format!("item-{id}"),
                    id * 7,
                    "a note of moderate length",
                ))?;
                id += 1;
            }
        }
        tx.commit()?;
        if id % 20_000 < per_txn as i64 {
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
            if std::fs::metadata(path)?.len() >= mb << 20 {
                break;
            }
        }
    }
    close_raw(c);
    Ok(id as u64)
}

struct Row {
    transport: &'static str,
    idle_kib: u64,
    stalled_kib: u64,
    hwm_kib: u64,
    open_secs: f64,
}

/// Opens one stalled client.
type Opener = fn(SocketAddr, usize) -> anyhow::Result<TcpStream>;

fn measure(
    dir: &Path,
    transport: &'static str,
    clients: usize,
    open: Opener,
) -> anyhow::Result<Row> {
    let server = ServerProcess::start(dir)?;
    warm_up(server.addr)?;
    let idle_kib = server.settled_rss_kib()?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        sockets.push(open(server.addr, i).with_context(|| format!("{transport} client {i}"))?);
    }
    let open_secs = started.elapsed().as_secs_f64();
    let stalled_kib = server.settled_rss_kib()?;
    let (_, hwm_kib) = server.memory_kib()?;
    if server.child.0.id() == 0 {
        bail!("no server process");
    }
    drop(sockets);
    Ok(Row {
        transport,
        idle_kib,
        stalled_kib,
        hwm_kib,
        open_secs,
    })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (mb, clients) = if full {
        (
            env_or("CRSYNC_LIMITS_BENCH_MB", 16u64),
            env_or("CRSYNC_LIMITS_BENCH_CLIENTS", 50usize),
        )
    } else {
        (1, 5)
    };
    let only = std::env::var("CRSYNC_LIMITS_BENCH_ONLY").unwrap_or_default();
    crsync::advanced::load_extension(None)?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    std::fs::create_dir_all(&data)?;
    let db = data.join(format!("{DB_NAME}.db"));
    let per_txn = env_or("CRSYNC_LIMITS_BENCH_ROWS_PER_TXN", ROWS_PER_TXN).max(1);
    let rows = write_database(&db, mb, per_txn)?;
    let size = std::fs::metadata(&db)?.len() as f64 / f64::from(1 << 20);
    println!(
        "crsync server memory with stalled clients ({rows} rows x 3 cols in transactions of {per_txn} rows, {:.1} MiB database, {clients} clients)",
        size
    );
    println!(
        "| transport | database | clients | server idle RSS | RSS with stalled clients | per stalled client | server peak (VmHWM) | opening all |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let transports: [(&'static str, &'static str, Opener); 2] =
        [("SSE", "sse", stalled_sse), ("WebSocket", "ws", stalled_ws)];
    for (name, short, open) in transports {
        if !only.is_empty() && only != short {
            continue;
        }
        let row = measure(work.path(), name, clients, open)?;
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "| {} | {:.1} MiB | {} | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.1} MiB | {:.2} s |",
            row.transport,
            size,
            clients,
            mib(row.idle_kib),
            mib(row.stalled_kib),
            mib(row.stalled_kib.saturating_sub(row.idle_kib)) / clients as f64,
            mib(row.hwm_kib),
            row.open_secs,
        );
    }
    Ok(())
}

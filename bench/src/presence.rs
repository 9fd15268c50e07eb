//! Presence fan-out: one client broadcasts 50 values (one per 40 ms) to a document that 100
//! other raw websocket clients subscribe to, through a real server (in process, file store);
//! each value's latency is from its send to its arrival at each subscriber. Peer: a raw
//! tokio-tungstenite relay that forwards each frame of one socket to 100 others.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::DocId;
use pagesync::TimelineKey;
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION};
use pagesync_server::Store;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::Config;
use crate::report::{Better, Pair};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const SUBSCRIBERS: usize = 100;
const DOC: DocId = DocId([0x9e; 16]);
/// Between broadcasts: above the server's 25 ms bound, so every value is told.
const EVERY: Duration = Duration::from_millis(40);

pub fn run(cfg: &Config) -> Vec<Pair> {
    let values = if cfg.quick { 10 } else { 50 };
    crate::runtime().block_on(async {
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            ours.push(ours_fan_out(values).await);
            peer.push(raw_fan_out(values).await);
        }
        let pct = |xs: &[f64], p: f64| {
            let mut xs = xs.to_vec();
            xs.sort_by(f64::total_cmp);
            xs[((xs.len() as f64 - 1.0) * p).round() as usize]
        };
        [("p50", 0.5), ("p99", 0.99)]
            .into_iter()
            .map(|(label, p)| {
                Pair::new(
                    "presence",
                    &format!("presence fan-out latency {label}: one broadcast to {SUBSCRIBERS} subscribers"),
                    "ms",
                    Better::Lower,
                    ours.iter().map(|run| pct(run, p)).collect(),
                    &format!("a raw websocket relay forwarding each frame to {SUBSCRIBERS} sockets"),
                    peer.iter().map(|run| pct(run, p)).collect(),
                    None,
                )
            })
            .collect()
    })
}

async fn connect(url: &str) -> Socket {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await.expect("connect");
    ws
}

async fn send(ws: &mut Socket, m: &Message) {
    ws.send(Ws::Binary(m.encode().into())).await.expect("send");
}

/// A subscriber's arrival times of each value (by its first byte), until `values` arrived.
fn receive(
    mut ws: Socket,
    values: usize,
    decode: fn(&[u8]) -> Option<u8>,
) -> tokio::task::JoinHandle<Vec<(u8, Instant)>> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(values);
        while got.len() < values {
            match ws.next().await {
                Some(Ok(Ws::Binary(b))) => {
                    if let Some(n) = decode(&b) {
                        got.push((n, Instant::now()));
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        got
    })
}

/// Latencies (ms) of `values` broadcasts through pagesync to `SUBSCRIBERS` subscribers.
async fn ours_fan_out(values: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _, stop) = crate::serve_here(Store::Files(dir.path().join("server")), |_| {}).await;
    let url = format!("ws://{addr}/v1/sync");
    let subscribe = |n: u128| Message::Subscribe {
        doc: DOC,
        key: TimelineKey::insecure_from_u128(n),
        storage_next: Lsn::FIRST,
        digests: false,
        create: true,
    };
    let hello = Message::Hello { version: PROTOCOL_VERSION, token: String::new() };
    let mut sender = connect(&url).await;
    send(&mut sender, &hello).await;
    send(&mut sender, &subscribe(1)).await;
    let mut receivers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut ws = connect(&url).await;
        send(&mut ws, &hello).await;
        send(&mut ws, &subscribe(100 + i as u128)).await;
        // Subscribed once acknowledged: nothing is missed after that.
        while let Some(Ok(m)) = ws.next().await {
            if let Ws::Binary(b) = m
                && matches!(Message::decode(&b), Ok(Message::MutationsAck { .. }))
            {
                break;
            }
        }
        receivers.push(receive(ws, values, |b| match Message::decode(b) {
            Ok(Message::Presence { peer, .. }) => peer.value.first().copied(),
            _ => None,
        }));
    }
    let sent = broadcast_all(
        values,
        |n| async move { Message::Broadcast { doc: DOC, value: vec![n] }.encode() },
        &mut sender,
    )
    .await;
    let latencies = collect(receivers, &sent).await;
    let _ = stop.send(());
    latencies
}

/// Sends `values` frames, one per `EVERY`: when each went.
async fn broadcast_all<F, Fut>(values: usize, frame: F, ws: &mut Socket) -> Vec<Instant>
where
    F: Fn(u8) -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let mut sent = Vec::with_capacity(values);
    let start = Instant::now();
    for n in 0..values {
        tokio::time::sleep_until((start + EVERY * n as u32).into()).await;
        let bytes = frame(n as u8).await;
        sent.push(Instant::now());
        ws.send(Ws::Binary(bytes.into())).await.expect("send");
    }
    sent
}

async fn collect(receivers: Vec<tokio::task::JoinHandle<Vec<(u8, Instant)>>>, sent: &[Instant]) -> Vec<f64> {
    let mut latencies = Vec::new();
    for r in receivers {
        let got = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("every value arrives")
            .expect("join");
        latencies.extend(got.into_iter().map(|(n, at)| (at - sent[n as usize]).as_secs_f64() * 1e3));
    }
    assert_eq!(latencies.len(), sent.len() * SUBSCRIBERS, "every subscriber got every value");
    latencies
}

/// Latencies (ms) of `values` frames through a raw relay to `SUBSCRIBERS` sockets.
async fn raw_fan_out(values: usize) -> Vec<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, _) = tokio::sync::broadcast::channel::<Ws>(1024);
    let relay = tx.clone();
    tokio::spawn(async move {
        // The first connection sends; every later one receives what it sends.
        let (s, _) = listener.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut from = tokio_tungstenite::accept_async(s).await.expect("ws");
        let fan = relay.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = from.next().await {
                let _ = fan.send(m);
            }
        });
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            s.set_nodelay(true).expect("nodelay");
            let mut to = tokio_tungstenite::accept_async(s).await.expect("ws");
            let mut rx = relay.subscribe();
            tokio::spawn(async move {
                // Subscribed: say so, then forward.
                let _ = to.send(Ws::Binary(vec![0xff].into())).await;
                while let Ok(m) = rx.recv().await {
                    if to.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let url = format!("ws://{addr}");
    let mut sender = connect(&url).await;
    let mut receivers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut ws = connect(&url).await;
        // Subscribed once the relay said so.
        while let Some(Ok(m)) = ws.next().await {
            if matches!(&m, Ws::Binary(b) if b.as_ref() == [0xff]) {
                break;
            }
        }
        receivers.push(receive(ws, values, |b| (b.len() == 64).then(|| b[0])));
    }
    // A frame the size of a `Presence` message.
    let sent = broadcast_all(values, |n| async move { [vec![n], vec![0; 63]].concat() }, &mut sender).await;
    drop(tx);
    collect(receivers, &sent).await
}

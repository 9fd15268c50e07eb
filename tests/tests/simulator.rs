//! The deterministic fault simulator over seeds. `PAGESYNC_SIM_SEEDS=N` runs N seeds per
//! shard (default 125; four shards, so 500 per run); `PAGESYNC_SIM_SEED=S` runs only seed S,
//! which reproduces a failure exactly.

use pagesync_tests::sim::Sim;

const SHARDS: u64 = 4;

fn run_shard(shard: u64) {
    if let Some(seed) = std::env::var("PAGESYNC_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        if seed % SHARDS == shard {
            let mut sim = Sim::new(seed);
            sim.run();
            sim.check();
        }
        return;
    }
    let per_shard: u64 = std::env::var("PAGESYNC_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(125);
    let (mut frames, mut dropped) = (0, 0);
    let mut stats = pagesync_tests::sim::Stats::default();
    for k in 0..per_shard {
        let mut sim = Sim::new(k * SHARDS + shard);
        sim.run();
        sim.check();
        frames += sim.frames_sent;
        dropped += sim.frames_dropped;
        stats.add(&sim.stats);
    }
    eprintln!("shard {shard}: {per_shard} seeds, {frames} frames, {dropped} dropped, {stats:?}");
    // The faults really happened.
    if per_shard >= 10 {
        assert!(dropped * 100 > frames, "only {dropped} of {frames} frames dropped");
        assert!(stats.server_crashes > 0 && stats.client_crashes > 0, "{stats:?}");
        assert!(stats.disconnects > 0 && stats.partitions > 0, "{stats:?}");
        assert!(stats.confirmed_transfers > 0 && stats.rejected_transfers > 0, "{stats:?}");
        assert!(stats.client_restarts > 0, "no client ever restarted at a checkpoint: {stats:?}");
        // The storage faults really happened, and the system saw them.
        assert!(stats.disk_full > 0 && stats.fsync_failures > 0 && stats.read_failures > 0, "{stats:?}");
        assert!(stats.torn_writes > 0 && stats.torn_tails_dropped > 0, "{stats:?}");
        assert!(stats.power_cuts > 0 && stats.power_cut_losses > 0 && stats.unsynced_lost > 0, "{stats:?}");
        assert!(stats.failed_puts > 0 && stats.unknown_puts > 0, "{stats:?}");
        assert!(stats.slow_appends > 0 && stats.slow_reads > 0 && stats.slow_steps > 0, "{stats:?}");
        assert!(stats.deferred_frames > 0, "no frame waited for a step: {stats:?}");
        assert!(stats.step_failures > 0 && stats.local_write_failures > 0, "{stats:?}");
        assert!(stats.client_apply_failures > 0 && stats.reopens > 0, "{stats:?}");
        assert!(stats.forgetting_entries > 0, "no step forgot copied rejections: {stats:?}");
        assert!(stats.confirmed_by_digest > 0, "no client kept a confirmation by digest: {stats:?}");
    }
}

#[test]
fn seeds_shard_0() {
    run_shard(0);
}

#[test]
fn seeds_shard_1() {
    run_shard(1);
}

#[test]
fn seeds_shard_2() {
    run_shard(2);
}

#[test]
fn seeds_shard_3() {
    run_shard(3);
}

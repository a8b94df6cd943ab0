import ArgumentParser
import FineMem
import FineMemHarness

struct RecoveryBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-recovery",
        abstract: "Reclaim a dead compute node holding about a million blocks of mixed sizes; print the rate.",
        discussion: """
            Lays down a pool where one compute node holds --blocks blocks (4-16 KiB chunk \
            blocks in full spans, 128-512 KiB section blocks, 4 MiB multi-section blocks), \
            fences it and recovers it through the memory node's loopback. Prints blocks \
            reclaimed per second in virtual time (latency model) and in immediate mode (the \
            CPU work alone: recovery's and the simulated NIC's), verbs and round trips per \
            block, and a live node's 4 KiB allocation latency before and during recovery. \
            Build in release: swift run -c release finemem bench-recovery
            """
    )

    @Option(help: "Blocks the dead node holds (rounded up to whole sections).") var blocks = 1_000_000
    @Option(help: "Seed.") var seed: UInt64 = 1

    func validate() throws {
        guard blocks >= 1, blocks <= 50_000_000 else { throw ValidationError("--blocks must be 1...50000000") }
    }

    func run() async throws {
        let result = await RecoveryBenchmark(blocks: blocks, seed: seed).run()
        guard result.violations.isEmpty else { throw ValidationError("the run failed: \(result.violations.prefix(3))") }
        let report = result.report
        let reclaimed = Double(report.blocksReclaimed)
        let virtualSeconds = Double(result.elapsedNanos) / 1e9
        let cpuSeconds = Double(result.cpuNanos) / 1e9
        let fabricSeconds = Double(result.fabricNanos) / 1e9
        print(Format.table([
            ("blocks held by the dead node", "\(result.blocksHeld) (chunk \(report.blocksByLayer[0]), section \(report.blocksByLayer[1]), multi-section \(report.blocksByLayer[2]))"),
            ("reclaimed", "\(report.blocksReclaimed) in \(report.passes) passes, \(report.recordsFreed) records freed, \(report.logsSettled) logs settled, \(report.spansClosed) spans closed"),
            ("virtual time (latency model)", "\(Format.fixed(virtualSeconds * 1e3, 2)) ms: \(Format.fixed(reclaimed / virtualSeconds / 1e6, 2)) M blocks/s"),
            ("CPU, immediate mode (wall)", "\(Format.fixed(cpuSeconds * 1e3, 2)) ms: \(Format.fixed(reclaimed / cpuSeconds / 1e6, 2)) M blocks/s, of which the simulated NIC \(Format.fixed(fabricSeconds * 1e3, 2)) ms"),
            ("CPU part alone (recovery's own work)", "\(Format.fixed((cpuSeconds - fabricSeconds) * 1e3, 2)) ms: \(Format.fixed(reclaimed / (cpuSeconds - fabricSeconds) / 1e6, 2)) M blocks/s"),
            ("verbs per reclaimed block", "\(Format.fixed(Double(report.verbs) / reclaimed, 3)) (\(report.verbs) verbs in \(report.batches) doorbells, \(report.retries) CAS retries)"),
            ("live 4 KiB allocation, median", "\(Format.fixed(Double(result.liveLatencyBefore) / 1e3, 2)) us before, \(Format.fixed(Double(result.liveLatencyDuring) / 1e3, 2)) us during (\(result.liveAllocationsDuring) allocations during recovery)"),
        ]))
    }
}

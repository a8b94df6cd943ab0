import ArgumentParser
import FineMem

struct Soak: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the simulated workload for many seeds, checking the invariants after every operation.",
        discussion: """
            Each seed runs compute nodes x tasks in deterministic virtual time with mixed \
            block sizes (4 KiB-8 MiB by default). A failing seed is printed with its \
            violations and the command that reproduces it exactly (the same seed and \
            the same flags, `--explore` included). `--explore` adds PCT-style schedule \
            exploration: random node priorities that reorder and delay nodes against \
            each other, with `--change-points` priority drops per run. Build in release \
            for speed: swift run -c release finemem soak --seeds 500
            """
    )

    @Option(help: "How many seeds to run.") var seeds = 20
    @Option(help: "The first seed.") var startSeed: UInt64 = 1
    @Option(help: "Memory nodes (0: alternate 1 and 3 by seed).") var memoryNodes = 0
    @Option(help: "Pool size of each memory node.") var poolSize = ByteCount(bytes: 64 << 20)
    @Option(help: "Compute nodes.") var computeNodes = 16
    @Option(help: "Tasks per compute node.") var tasks = 8
    @Option(help: "Operations per task.") var operations = 40
    @Option(help: "Largest block.") var maxBlock = ByteCount(bytes: 8 << 20)
    @Flag(help: "Explore schedules with random node priorities (PCT-style).") var explore = false
    @Option(help: "Priority change points per run with --explore.") var changePoints = 3

    func validate() throws {
        guard seeds >= 1, computeNodes >= 1, tasks >= 1, operations >= 1, memoryNodes >= 0, changePoints >= 0 else {
            throw ValidationError("counts must be positive")
        }
        guard maxBlock.bytes >= 4096, maxBlock.bytes.nonzeroBitCount == 1 else { throw ValidationError("--max-block must be a power of two from 4KiB") }
    }

    func run() throws {
        var configuration = SimulatedWorkload.Configuration()
        configuration.poolBytesPerNode = poolSize.bytes
        configuration.computeNodes = computeNodes
        configuration.tasksPerComputeNode = tasks
        configuration.operationsPerTask = operations
        configuration.chunkCountLog2Range = 0...Block.chunkCountLog2(forBytes: maxBlock.bytes)
        configuration.exploration = explore ? .randomPriorities(changePoints: changePoints) : .none
        print("schedule exploration: \(configuration.exploration)")
        let clock = SystemRuntime.shared
        let start = clock.nowNanoseconds
        var failed: [UInt64] = []
        var allocations = 0
        for seed in startSeed..<startSeed + UInt64(seeds) {
            configuration.memoryNodes = memoryNodes > 0 ? memoryNodes : (seed % 3 == 0 ? 3 : 1)
            let report = SimulatedWorkload(configuration).run(seed: seed)
            allocations += report.allocations
            if !report.violations.isEmpty {
                failed.append(seed)
                print("FAILED \(report)")
                for violation in report.violations.prefix(10) { print("  \(violation)") }
                print("  replay: \(replayCommand(seed: seed))")
            }
            let done = Int(seed - startSeed) + 1
            if done % 10 == 0 || done == seeds {
                let minutes = Double(clock.nowNanoseconds - start) / 60e9
                print("\(done)/\(seeds) seeds, \(failed.count) failed, \(allocations) allocations, \(Format.fixed(Double(done) / minutes, 1)) seeds per minute")
            }
        }
        if !failed.isEmpty {
            print("failing seeds: \(failed.map(String.init).joined(separator: " "))")
            throw ExitCode.failure
        }
    }

    /// The command that reruns exactly `seed`: every flag that shapes the run.
    private func replayCommand(seed: UInt64) -> String {
        var flags = [
            "--start-seed \(seed)", "--seeds 1", "--memory-nodes \(memoryNodes)", "--pool-size \(poolSize.bytes)",
            "--compute-nodes \(computeNodes)", "--tasks \(tasks)", "--operations \(operations)", "--max-block \(maxBlock.bytes)",
        ]
        if explore { flags += ["--explore", "--change-points \(changePoints)"] }
        return "swift run -c release finemem soak " + flags.joined(separator: " ")
    }
}

import ArgumentParser
import FineMem
import FineMemHarness

struct CrashPoints: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "crashpoints",
        abstract: "Crash a compute node (or a recoverer) after each of its verbs, recover, check every invariant.",
        discussion: """
            For each operation kind (allocate and free in each size layer, a span open and \
            close, multi-section allocate and free, and recovery itself) the node running it \
            crashes after its k-th verb, for every k from 0 to the number of verbs it runs \
            (the commit, the flush and the span upkeep that follow; inside a batch, after \
            each executed prefix), with its posted but unexecuted verbs dropped, and again \
            with them executed late. Two other compute nodes allocate and free throughout. \
            Then the node is fenced and recovered, every invariant is checked, the node \
            restarts and everyone frees: the pool must be empty. Prints, per operation and \
            seed, the crash points, runs and violations; exits 1 on any violation. Each seed \
            is a different interleaving with the live nodes. With --cache-shards N (above 1) \
            every compute node has N cache shards, each with a queue pair of its own, and \
            one for the upkeep (the pool grows to 4 sections of 2 MiB per shard): the \
            crashing operation and its upkeep post on different queue pairs. Build in \
            release for speed: swift run -c release finemem crashpoints --seeds 4
            """
    )

    @Option(help: "One operation (default: all): \(CrashPointEnumeration.Operation.allCases.map(\.rawValue).joined(separator: ", ")).")
    var operation: String?
    @Option(help: "Seeds (interleavings) per operation, starting at --first-seed.") var seeds = 1
    @Option(help: "The first seed.") var firstSeed: UInt64 = 1
    @Option(help: "Operations of each live compute node during the crash and the recovery.") var loadOperations = 12
    @Option(help: "Shards of each compute node's header cache, each with its own queue pair (the pool has 4 sections of 2 MiB per shard, 16 MiB at least).")
    var cacheShards = 1

    func validate() throws {
        if let operation, CrashPointEnumeration.Operation(rawValue: operation) == nil {
            throw ValidationError("no operation \(operation)")
        }
        guard seeds >= 1, loadOperations >= 0, cacheShards >= 1 else {
            throw ValidationError("--seeds and --cache-shards must be at least 1, --load-operations at least 0")
        }
    }

    func run() throws {
        let operations = operation.map { [CrashPointEnumeration.Operation(rawValue: $0)!] } ?? CrashPointEnumeration.Operation.allCases
        let clock = ContinuousClock()
        let start = clock.now
        if cacheShards > 1 {
            print("\(cacheShards) cache shards and \(cacheShards + 1) queue pairs per compute node, \(Format.bytes(CrashPointEnumeration.poolBytes(cacheShards: cacheShards))) pool")
        }
        var runs = 0
        var failed = false
        for operation in operations {
            var points = 0
            for seed in firstSeed..<firstSeed + UInt64(seeds) {
                let summary = CrashPointEnumeration(seed: seed, loadOperations: loadOperations, cacheShards: cacheShards).run(operation)
                print(summary)
                points += summary.crashPoints
                runs += summary.runs
                for violation in summary.violations.prefix(10) { print("  violation: \(violation)") }
                if !summary.violations.isEmpty {
                    failed = true
                    print("  replay: finemem crashpoints --operation \(operation.rawValue) --first-seed \(seed)\(cacheShards > 1 ? " --cache-shards \(cacheShards)" : "")")
                }
            }
            print("\(operation.rawValue): \(points) crash points over \(seeds) seeds")
        }
        print("crashpoints: \(runs) runs in \(clock.now - start), \(failed ? "FAILED" : "0 violations")")
        if failed { throw ExitCode(1) }
    }
}

import ArgumentParser
import FineMem
import FineMemHarness
import Synchronization

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run an allocate/free workload on an embedded cluster and print what it cost.",
        discussion: """
            Starts memory nodes on simulated NICs (or, with --fabric verbs, on a real RDMA \
            device over real queue pairs) and compute nodes in this process, then \
            runs tasks on real threads: each fills the pool to --fill percent with blocks \
            of mixed sizes (4 KiB up to --max-block, small ones more often), then frees \
            random blocks and allocates new ones. Every buffer gets a tag written into it \
            and checked before it is freed. Prints progress every second and a summary.
            """
    )

    @Option(help: "Memory nodes in the cluster.") var memoryNodes = 1
    @Option(help: "Pool size of each memory node (e.g. 512MiB, 1GiB; default 1GiB, 64MiB on verbs).") var poolSize: ByteCount?
    @Option(help: "The memory nodes' NIC: simulated, or verbs (a real RDMA device, see --device).") var fabric = FabricChoice.simulated
    @Option(help: "The RDMA device for --fabric verbs (e.g. rxe0, mlx5_0).") var device: String?

    enum FabricChoice: String, ExpressibleByArgument { case simulated, verbs }

    var pool: UInt64 { poolSize?.bytes ?? (fabric == .verbs ? 64 << 20 : 1 << 30) }

    var clusterFabric: Fabric {
        switch fabric {
        case .simulated: .simulated
        case .verbs: .verbs(device: device ?? "")
        }
    }
    @Option(help: "Compute nodes (each runs its own allocator).") var computeNodes = 4
    @Option(help: "Tasks per compute node.") var tasks = 8
    @Option(help: "Seconds to run.") var duration = 3.0
    @Option(help: "Largest block (a power of two from 4KiB).") var maxBlock = ByteCount(bytes: 8 << 20)
    @Option(help: "Percent of the pool the workload keeps allocated.") var fill = 70
    @Option(help: "Seed of the workload's random choices.") var seed: UInt64 = 1

    func validate() throws {
        guard memoryNodes >= 1, computeNodes >= 1, tasks >= 1 else { throw ValidationError("node and task counts must be at least 1") }
        guard duration > 0, duration <= 3_600 else { throw ValidationError("--duration must be in (0, 3600] seconds") }
        guard (1...95).contains(fill) else { throw ValidationError("--fill must be 1...95") }
        if fabric == .verbs, device?.isEmpty ?? true { throw ValidationError("--fabric verbs needs --device (see `finemem devices`)") }
        if fabric == .simulated, device != nil { throw ValidationError("--device applies to --fabric verbs only") }
        guard maxBlock.bytes >= 4096, maxBlock.bytes.nonzeroBitCount == 1, maxBlock.bytes <= pool else {
            throw ValidationError("--max-block must be a power of two from 4KiB up to the pool size")
        }
    }

    func run() async throws {
        let cluster = try await EmbeddedCluster.start(.init(memoryNodes: memoryNodes, poolBytesPerNode: pool, computeNodes: computeNodes, fabric: clusterFabric))
        let geometry = cluster.memoryNodes[0].geometry
        let poolBytes = geometry.dataBytes * UInt64(memoryNodes)
        print("FineMem demo on the \(clusterFabric): \(memoryNodes) memory node(s) x \(Format.bytes(geometry.dataBytes)), \(computeNodes) compute nodes x \(tasks) tasks, blocks 4 KiB-\(maxBlock), \(Format.fixed(duration, 1)) s")
        #if DEBUG
        print("(a debug build: unoptimized, and the compute nodes check what changed in their header caches after every operation, so the pool fills slowly; for speed figures, `swift run -c release finemem demo`)")
        #endif
        let meter = DemoMeter(poolBytes: poolBytes, fillPercent: fill)
        let chunkCountLog2Max = Block.chunkCountLog2(forBytes: maxBlock.bytes)
        let clock = SystemRuntime.shared
        let start = clock.nowNanoseconds
        let cpuStart = processCPUNanoseconds()
        let deadline = start + UInt64(duration * 1e9)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for node in 0..<computeNodes {
                for task in 0..<tasks {
                    let allocator = try cluster.makeAllocator(computeNode: node, application: ApplicationID(UInt16(task + 1)))
                    let taskSeed = seed &* 1_000_003 &+ UInt64(node * tasks + task)
                    group.addTask {
                        var task = DemoTask(allocator: allocator, chunkCountLog2Max: chunkCountLog2Max, meter: meter, random: SeededRandom(seed: taskSeed))
                        try await task.run(until: deadline)
                    }
                }
            }
            group.addTask {
                // One line per second: sleep until the next whole second after the start
                // (or the deadline), however late the previous wake-up was.
                var second: UInt64 = 1
                while clock.nowNanoseconds < deadline {
                    let wake = min(start + second * 1_000_000_000, deadline)
                    let now = clock.nowNanoseconds
                    if wake > now { await clock.sleep(nanoseconds: wake - now) }
                    let (operations, live, _) = meter.snapshot()
                    let elapsed = Double(clock.nowNanoseconds - start) / 1e9
                    print("  \(Format.fixed(elapsed, 1)) s: \(operations) operations, \(Int(Double(operations) / elapsed)) ops/s, pool \(Format.fixed(100 * Double(live) / Double(poolBytes), 1)) % in use")
                    second = (clock.nowNanoseconds - start) / 1_000_000_000 + 1
                }
            }
            try await group.waitForAll()
        }
        let elapsed = Double(clock.nowNanoseconds - start) / 1e9
        let cpu = processCPUNanoseconds() - cpuStart
        await cluster.quiesce()
        let stats = cluster.statistics
        let (operations, _, peak) = meter.snapshot()
        let histogram = zip(AllocatorStatistics.retryBucketBounds.map { "<=\($0)" } + [">\(AllocatorStatistics.retryBucketBounds.last!)"], stats.retryHistogram)
            .filter { $0.1 > 0 }.map { "\($0.0): \($0.1)" }.joined(separator: ", ")
        print("")
        print(Format.table([
            ("operations", "\(operations) (\(stats.allocations) allocations, \(stats.frees) frees, \(stats.failedAllocations) out of memory)"),
            ("ops/s", "\(Int(Double(operations) / elapsed))"),
            ("CPU per operation", "\(Format.fixed(Double(cpu) / Double(max(1, operations)) / 1_000, 3)) us (every thread; ops/s also counts the time other processes had the CPUs)"),
            ("CAS retries avg/max", "\(Format.fixed(stats.casRetriesAverage, 3)) / \(stats.casRetriesMax)"),
            ("CAS retry histogram", histogram),
            ("round trips per allocation", "\(Format.fixed(stats.roundTripsPerAllocation, 3)) (verbs \(Format.fixed(stats.verbsPerAllocation, 3)))"),
            ("round trips per free", Format.fixed(stats.roundTripsPerFree, 3)),
            ("upkeep round trips", "\(stats.upkeepBatches) (after the answer)"),
            ("pool utilisation peak", "\(Format.fixed(100 * Double(peak) / Double(poolBytes), 1)) % of \(Format.bytes(poolBytes))"),
            ("metadata overhead", "\(Format.fixed(geometry.metadataOverheadPercent, 3)) % of the pool (\(Format.fixed(geometry.metadataAreaPercent, 3)) % with alignment)"),
        ]))
    }
}

/// Live bytes and operation counts shared by the demo's tasks: atomics 64 bytes apart,
/// each on a cache line of its own (a lock here, taken three times per operation by every
/// task, was a bottleneck of the demo's own).
final class DemoMeter: Sendable {
    let poolBytes: UInt64
    let targetBytes: UInt64
    private let counters = InlineArray<17, Atomic<UInt64>> { _ in Atomic(0) }
    private static let operations = 0, live = 8, peak = 16

    init(poolBytes: UInt64, fillPercent: Int) {
        self.poolBytes = poolBytes
        targetBytes = poolBytes / 100 * UInt64(fillPercent)
    }

    func allocated(_ bytes: Int) {
        counters[Self.operations].add(1, ordering: .relaxed)
        let live = counters[Self.live].add(UInt64(bytes), ordering: .relaxed).newValue
        var peak = counters[Self.peak].load(ordering: .relaxed)
        while live > peak {
            let (exchanged, original) = counters[Self.peak].weakCompareExchange(expected: peak, desired: live, ordering: .relaxed)
            if exchanged { break }
            peak = original
        }
    }

    func freed(_ bytes: Int) {
        counters[Self.operations].add(1, ordering: .relaxed)
        counters[Self.live].subtract(UInt64(bytes), ordering: .relaxed)
    }

    var belowTarget: Bool { counters[Self.live].load(ordering: .relaxed) < targetBytes }
    func snapshot() -> (operations: UInt64, live: UInt64, peak: UInt64) {
        (counters[Self.operations].load(ordering: .relaxed), counters[Self.live].load(ordering: .relaxed), counters[Self.peak].load(ordering: .relaxed))
    }
}

/// One task of the demo: keeps the pool near the fill target with tagged buffers.
private struct DemoTask {
    let allocator: RemoteAllocator
    let chunkCountLog2Max: Int
    let meter: DemoMeter
    var random: SeededRandom
    var held: [(buffer: RemoteBuffer, tag: UInt64)] = []
    /// The task's local buffer for the tags it writes and reads back (as an RDMA
    /// application posts from memory it registered once); freed by `run`.
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)

    /// Checks a random held buffer's tag and frees it.
    mutating func freeOne() async throws {
        // Swapped to the end and removed there: the order of `held` does not matter, and
        // removing from the middle moved half the array on every free.
        held.swapAt(Int(random.next() % UInt64(held.count)), held.count - 1)
        let (buffer, tag) = held.removeLast()
        try await allocator.read(buffer, offset: buffer.length - 8, into: scratch)
        let read = UInt64(littleEndian: scratch.load(as: UInt64.self))
        guard read == tag else { throw ValidationError("buffer \(buffer) lost its tag: another block overlapped it") }
        try await allocator.free(buffer)
        meter.freed(buffer.length)
    }

    /// Allocates a buffer (sizes weighted so each size class carries about the same bytes)
    /// and writes a tag at its end; answers false when the pool is full.
    mutating func allocateOne() async throws -> Bool {
        var chunkCountLog2 = 0
        while chunkCountLog2 < chunkCountLog2Max, random.next() % 2 == 0 { chunkCountLog2 += 1 }
        let buffer: RemoteBuffer
        do throws(AllocationError) {
            buffer = try await allocator.allocate(bytes: 4096 << chunkCountLog2)
        } catch {
            if case .outOfMemory = error { return false }
            throw error
        }
        let tag = random.next()
        scratch.storeBytes(of: tag.littleEndian, as: UInt64.self)
        try await allocator.write(from: UnsafeRawBufferPointer(scratch), to: buffer, at: buffer.length - 8)
        held.append((buffer, tag))
        meter.allocated(buffer.length)
        return true
    }

    /// How long a task keeps its thread before it yields: an operation on the simulated
    /// NIC does not suspend the task when nobody contends, so without yields the first
    /// tasks to run would keep the threads to themselves (and the progress lines would
    /// wait). A slice rather than a count of operations: a thousand or so in a release
    /// build, each one in a debug build.
    static let sliceNanos: UInt64 = 1_000_000

    mutating func run(until deadline: UInt64) async throws {
        defer { scratch.deallocate() }
        var sliceStart = SystemRuntime.shared.nowNanoseconds
        while true {
            let now = SystemRuntime.shared.nowNanoseconds
            guard now < deadline else { break }
            if now - sliceStart >= Self.sliceNanos {
                await Task.yield()
                sliceStart = SystemRuntime.shared.nowNanoseconds
            }
            if !held.isEmpty, !meter.belowTarget || random.next() % 4 == 0 {
                try await freeOne()
            } else if try await !allocateOne(), !held.isEmpty {
                try await freeOne()
            }
        }
        while !held.isEmpty { try await freeOne() }
    }
}

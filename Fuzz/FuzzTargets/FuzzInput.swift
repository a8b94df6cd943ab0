import FineMem
import FineMemHarness

/// Reads a fuzzer's bytes as a stream of small numbers; past the end it answers zeros, so
/// every input is a valid program.
struct FuzzInput {
    private let bytes: [UInt8]
    private var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { position >= bytes.count }

    mutating func byte() -> UInt8 {
        defer { position += 1 }
        return position < bytes.count ? bytes[position] : 0
    }

    mutating func word() -> UInt64 {
        (0..<8).reduce(0) { value, i in value | UInt64(byte()) << (8 * UInt64(i)) }
    }
}

/// What a fuzz input's header picks besides the seed: the cache shards of every compute
/// node (1, or 4: a connection per shard and one for the upkeep, so that an operation and
/// its upkeep, and operations of different applications, post on different queue pairs).
struct FuzzShape: Sendable {
    let cacheShards: Int

    /// Bit 58 of the seed word (bit 2 of the header's eighth byte) asks for 4 shards.
    init(seed: UInt64) { cacheShards = seed >> 58 & 1 == 1 ? 4 : 1 }

    /// The cluster of a target: `poolBytesPerNode`, or with 4 shards at least 4 sections
    /// of 2 MiB per shard (32 MiB), so that the nodes get them.
    func configuration(memoryNodes: Int, poolBytesPerNode: UInt64, computeNodes: Int) -> EmbeddedCluster.Configuration {
        var configuration = EmbeddedCluster.Configuration(
            memoryNodes: memoryNodes, poolBytesPerNode: max(poolBytesPerNode, UInt64(cacheShards) * 4 * PoolGeometry.sectionBytes),
            computeNodes: computeNodes)
        configuration.allocator.cacheShards = cacheShards
        return configuration
    }

    /// What is wrong with the shards and lanes of `cluster`'s compute nodes: a set-up
    /// failure (the program would not reach the lanes it means to).
    func check(_ cluster: EmbeddedCluster) -> [String] {
        let lanes = cacheShards > 1 ? cacheShards + 1 : 1
        return cluster.computeNodes.flatMap { node in
            (0..<cluster.memoryNodes.count).compactMap { index in
                node.cacheShards(memoryNode: index) == cacheShards && node.lanes(memoryNode: index) == lanes ? nil
                    : "set-up: \(node.owner) has \(node.cacheShards(memoryNode: index)) shards and \(node.lanes(memoryNode: index)) lanes on memory node \(index), not \(cacheShards) and \(lanes)"
            }
        }
    }
}

/// The cache shards a fuzz program runs with (its header's choice, see `simulateProgram`).
package func fuzzCacheShards(_ bytes: [UInt8]) -> Int {
    var header = FuzzInput(bytes)
    return FuzzShape(seed: header.word()).cacheShards
}

/// Runs a fuzz program in virtual time and answers the violations it found, each with the
/// simulation's seed. The first 8 bytes of `bytes` seed the simulation; the seed's top byte
/// chooses the schedule (its low 2 bits): as timed (a quarter of the inputs), or PCT-style
/// random node priorities with 1-3 change points; and the cache shards (its bit 2,
/// `FuzzShape`): 1, or 4 in a pool large enough for them. The rest is the program, read by
/// `body`.
func simulateProgram(
    _ bytes: [UInt8], _ body: @escaping @Sendable (inout FuzzInput, Simulator, Failures, FuzzShape) async -> Void
) -> [String] {
    var header = FuzzInput(bytes)
    let seed = header.word()
    let changePoints = Int(seed >> 56) % 4
    let shape = FuzzShape(seed: seed)
    let simulator = Simulator(
        seed: seed, latency: LatencyModel(), exploration: changePoints == 0 ? .none : .randomPriorities(changePoints: changePoints))
    let program = Array(bytes.dropFirst(8))
    let failures = Failures()
    simulator.spawn {
        var input = FuzzInput(program)
        await body(&input, simulator, failures, shape)
    }
    simulator.run()
    return failures.all.map { "seed \(simulator.seed)\(shape.cacheShards > 1 ? ", \(shape.cacheShards) shards" : ""): \($0)" }
}

/// One reliable connection from a compute node to a memory node: the seam through which
/// every protocol layer reaches remote memory, on a real RDMA NIC or a simulated one.
///
/// A batch is posted with one doorbell: its verbs execute in order, each atomically (an
/// atomic verb against every other atomic verb on the same NIC), and the results come back
/// together, in posting order. Verbs of other connections may interleave between them.
/// "In order" is the order of a reliable-connected QP (see `Verb`): an unfenced WRITE may
/// execute before READs and atomics posted earlier on the same connection, in the same
/// batch or in an earlier one still outstanding; put `.fenced()` on a WRITE that must not.
/// The first failing verb breaks the connection (the QP's error state); later verbs of
/// that batch do not execute, and every later verb on the connection fails with
/// `connectionBroken`. The memory node can also break a connection (fencing a compute
/// node, `NICControl.breakConnections(of:)`).
///
/// ```swift
/// let results = try await connection.post([
///     .compareAndSwap(header, expected: old, desired: new, rkey: key),
///     .read(entry, length: 8, rkey: key),
/// ])
/// let (exchanged, original) = results[0].compareAndSwap
/// ```
package protocol FabricConnection: AnyObject, Sendable {
    /// The memory node at the other end.
    var remoteNode: NodeID { get }
    /// Posts `verbs` as one ordered batch and waits for all completions.
    func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult]
    /// Posts the verbs of `batch` as one ordered batch, as `post(_:)` would, and stores
    /// their answers in it. A backend that can do so without allocating (the simulated
    /// NIC in immediate mode) overrides the default, which goes through `post(_:)`.
    func post(_ batch: inout WordBatch) async throws(FabricError)
    /// RDMA READ of `destination.count` bytes at `address` into the caller's memory, which
    /// must stay valid until this returns. The default goes through `post(_:)`; a backend
    /// that can copy without allocating overrides it.
    func read(_ address: RemoteAddress, rkey: RKey, into destination: UnsafeMutableRawBufferPointer) async throws(FabricError)
    /// RDMA WRITE of the bytes of `source` (valid until this returns) at `address`, as
    /// `read(_:rkey:into:)` reads.
    func write(_ address: RemoteAddress, rkey: RKey, from source: UnsafeRawBufferPointer) async throws(FabricError)
    /// Another connection from the same compute node to the same memory node, with the
    /// same rights (a queue pair of its own, broken by the same fencing), or nil when this
    /// backend opens none (the default). A compute node gives each shard of its header
    /// cache a connection of its own, so that tasks on different CPUs post without sharing
    /// a queue pair's lock.
    func sibling() -> (any FabricConnection)?
}

extension FabricConnection {
    package func post(_ batch: inout WordBatch) async throws(FabricError) {
        try await postAsVerbs(&batch)
    }

    /// Posts the verbs of `batch` through `post(_:)` and stores their answers in it.
    package func postAsVerbs(_ batch: inout WordBatch) async throws(FabricError) {
        batch.store(try await post(batch.verbs))
    }

    package func sibling() -> (any FabricConnection)? { nil }

    package func read(_ address: RemoteAddress, rkey: RKey, into destination: UnsafeMutableRawBufferPointer) async throws(FabricError) {
        let bytes = try await read(address, length: destination.count, rkey: rkey)
        destination.copyBytes(from: bytes)
    }

    package func write(_ address: RemoteAddress, rkey: RKey, from source: UnsafeRawBufferPointer) async throws(FabricError) {
        try await write(address, bytes: Array(source), rkey: rkey)
    }

    /// RDMA READ.
    package func read(_ address: RemoteAddress, length: Int, rkey: RKey) async throws(FabricError) -> [UInt8] {
        try await post([.read(address, length: length, rkey: rkey)])[0].bytes
    }

    /// RDMA READ of consecutive 64-bit words.
    package func readWords(_ address: RemoteAddress, count: Int, rkey: RKey) async throws(FabricError) -> [UInt64] {
        try await post([.readWords(address, count: count, rkey: rkey)])[0].words
    }

    /// RDMA WRITE.
    package func write(_ address: RemoteAddress, bytes: [UInt8], rkey: RKey) async throws(FabricError) {
        _ = try await post([.write(address, bytes: bytes, rkey: rkey)])
    }

    /// RDMA compare-and-swap of an 8-byte word; answers whether it exchanged and the
    /// original value (as swift-atomics' `compareExchange`).
    package func compareAndSwap(
        _ address: RemoteAddress, expected: UInt64, desired: UInt64, rkey: RKey
    ) async throws(FabricError) -> (exchanged: Bool, original: UInt64) {
        try await post([.compareAndSwap(address, expected: expected, desired: desired, rkey: rkey)])[0].compareAndSwap
    }

    /// RDMA fetch-and-add (wrapping); answers the original value.
    package func fetchAndAdd(_ address: RemoteAddress, delta: UInt64, rkey: RKey) async throws(FabricError) -> UInt64 {
        guard case .fetchAndAdd(let original) = try await post([.fetchAndAdd(address, delta: delta, rkey: rkey)])[0] else {
            preconditionFailure("fetch-and-add completed as another verb")
        }
        return original
    }
}

/// Verb, batch and byte counts of one connection.
package struct FabricCounters: Sendable, Hashable {
    /// Batches posted (one doorbell, one network round trip each).
    package var batches: UInt64 = 0
    /// Verbs executed, by kind (`VerbKind.rawValue` indexes the array).
    package var verbs: [UInt64] = Array(repeating: 0, count: VerbKind.allCases.count)
    package var bytesRead: UInt64 = 0
    package var bytesWritten: UInt64 = 0

    package init() {}

    package var totalVerbs: UInt64 { verbs.reduce(0, +) }
    package subscript(kind: VerbKind) -> UInt64 { verbs[kind.rawValue] }

    package static func + (lhs: FabricCounters, rhs: FabricCounters) -> FabricCounters {
        var sum = lhs
        sum.batches += rhs.batches
        for kind in sum.verbs.indices { sum.verbs[kind] += rhs.verbs[kind] }
        sum.bytesRead += rhs.bytesRead
        sum.bytesWritten += rhs.bytesWritten
        return sum
    }
}

import FineMem

/// DESIGN.md invariant 7, checked from the pool's own words: "Out of memory is answered
/// only when the pool had no room for the request at some instant during the call".
///
/// The oracle knows nothing of the allocator's cache. A workload wraps each allocation
/// call in `begin` and `end`; the oracle looks at the pool when a call begins and, through
/// the simulator (`Simulator.observeChanges`), right after every verb that changes a
/// section or span header of a memory node while calls are in flight: for each call in
/// flight that has not yet seen it, it asks whether that memory node has no room for the
/// call's size at that instant, and if so marks the call. An `outOfMemory` answer is
/// sound when, on every memory node, the call saw no room at some instant (not the same
/// one for all: an allocation tries the memory nodes one after the other). A call that
/// never saw it on some memory node answered out of memory while room for it existed
/// there at every instant of the call: a violation.
///
/// Room for `2^k` chunks, from the header words as they are (a pending log does not hide
/// room: a search waits for the flush, it does not answer out of memory):
/// - 1-16 chunks: a span whose section entry is empty (it can be opened), or a span in
///   chunk mode whose span header is open with a free aligned run of `2^k` chunks;
/// - 1-16 spans: an aligned run of `2^(k-5)` empty entries in a section header;
/// - more: an aligned run of `2^(k-9)` sections whose headers have every entry empty.
///
/// A span being opened or closed (its span header `opening` or `closing` while its entry
/// is in chunk mode) counts as no room: the oracle errs on the side of seeing no room, so
/// a violation it reports is one, never an artefact of a transient state. It sees the
/// verbs of virtual-time connections (every compute node's), not a memory node's loopback
/// (fencing and recovery through it).
///
/// ```swift
/// let oracle = OutOfMemoryOracle(cluster: cluster, simulator: simulator)
/// let call = oracle.begin(chunkCountLog2: 0)
/// do { _ = try await node.allocate(chunkCountLog2: 0, application: app); oracle.end(call) }
/// catch { if let violation = oracle.outOfMemory(call) { print(violation) } }
/// ```
package final class OutOfMemoryOracle: @unchecked Sendable {
    /// One memory node's pool, read through its simulated NIC.
    private struct Pool {
        let id: NodeID
        let geometry: PoolGeometry
        let base: RemoteAddress
        let peek: (RemoteAddress) -> UInt64
        /// The section and span headers: the words a change of which may change room.
        let headers: Range<UInt64>
    }

    /// An allocation call in flight.
    private struct Call {
        let chunkCountLog2: Int
        let began: UInt64
        /// Bit `i`: the call saw no room on memory node `pools[i]`.
        var sawNoRoom: UInt64 = 0
    }

    private let pools: [Pool]
    private let simulator: Simulator
    private let lock = Lock()
    private var calls: [Int: Call] = [:]
    private var nextCall = 0
    /// Every bit of `sawNoRoom` a call can have.
    private let allPools: UInt64
    /// How many times a pool was looked at (to tell that the oracle looked at all).
    private var looks = 0

    /// An oracle over every memory node of `cluster` (on the simulated NIC, in the virtual
    /// time of `simulator`); it installs itself as the simulator's change observer.
    package init(cluster: EmbeddedCluster, simulator: Simulator) {
        pools = zip(cluster.memoryNodes, cluster.nics).map { node, nic in
            let geometry = node.geometry
            let start = nic.baseAddress.rawValue + geometry.sectionHeadersOffset
            let end = nic.baseAddress.rawValue + geometry.spanHeadersOffset + 8 * UInt64(geometry.spanCount)
            return Pool(id: node.id, geometry: geometry, base: nic.baseAddress, peek: nic.peekWord, headers: start..<end)
        }
        precondition(pools.count <= 64, "the oracle keeps a bit per memory node")
        allPools = pools.count == 64 ? ~0 : (1 << UInt64(pools.count)) - 1
        self.simulator = simulator
        simulator.observeChanges { [weak self] verb, memoryNode in self?.changed(verb, on: memoryNode) }
    }

    /// How many times the oracle has looked at a pool for calls in flight.
    package var poolLooks: Int { lock.withLock { looks } }

    /// An allocation of `2^chunkCountLog2` chunks begins now; answers its handle. The pool
    /// is looked at as it is now.
    package func begin(chunkCountLog2: Int) -> Int {
        lock.withLock {
            let id = nextCall
            nextCall += 1
            var call = Call(chunkCountLog2: chunkCountLog2, began: simulator.nowNanoseconds)
            for index in pools.indices where !hasRoom(pools[index], chunkCountLog2: chunkCountLog2) { call.sawNoRoom |= 1 << UInt64(index) }
            looks += pools.count
            calls[id] = call
            return id
        }
    }

    /// The call `id` answered a block (or an error other than out of memory).
    package func end(_ id: Int) {
        _ = lock.withLock { calls.removeValue(forKey: id) }
    }

    /// The call `id` answered out of memory now: answers the violation, if it never saw
    /// no room on some memory node, with where room for it is at the answer.
    package func outOfMemory(_ id: Int) -> String? {
        lock.withLock {
            guard let call = calls.removeValue(forKey: id) else { return "invariant 7: no call \(id) in flight" }
            guard call.sawNoRoom != allPools else { return nil }
            let missed = pools.indices.filter { call.sawNoRoom & (1 << UInt64($0)) == 0 }
            let wheres = missed.map { "\(pools[$0].id) \(room(pools[$0], chunkCountLog2: call.chunkCountLog2) ?? "(no room left at the answer)")" }
            return "invariant 7: out of memory for 2^\(call.chunkCountLog2) chunks in a call from \(call.began) to \(simulator.nowNanoseconds) ns, "
                + "but the pool had room for it at every instant of the call (section and span headers after each change) on \(missed.map { pools[$0].id }); "
                + "at the answer: \(wheres.joined(separator: "; "))"
        }
    }

    /// The simulator's observer: a verb changed memory of `memoryNode`.
    private func changed(_ verb: Verb, on memoryNode: NodeID) {
        lock.withLock {
            guard !calls.isEmpty, let index = pools.firstIndex(where: { $0.id == memoryNode }),
                  pools[index].headers.contains(verb.address.rawValue)
            else { return }
            let bit: UInt64 = 1 << UInt64(index)
            // Sizes not yet seen without room on this pool, by some call in flight.
            var sizes: UInt64 = 0
            for call in calls.values where call.sawNoRoom & bit == 0 { sizes |= 1 << UInt64(call.chunkCountLog2) }
            guard sizes != 0 else { return }
            looks += 1
            let room = roomMask(pools[index])
            guard sizes & ~room != 0 else { return }
            for (id, call) in calls where call.sawNoRoom & bit == 0 && room & (1 << UInt64(call.chunkCountLog2)) == 0 {
                calls[id]!.sawNoRoom |= bit
            }
        }
    }

    // MARK: The predicate (from the words, with the layout's decoders only)

    private func section(_ pool: Pool, _ index: Int) -> SectionHeader? {
        SectionHeader(rawValue: pool.peek(pool.base + pool.geometry.sectionHeaderOffset(index)))
    }

    private func span(_ pool: Pool, _ section: Int, _ index: Int) -> SpanHeader? {
        SpanHeader(rawValue: pool.peek(pool.base + pool.geometry.spanHeaderOffset(section: section, span: index)))
    }

    /// Whether `bits` (a unit per bit, `units` of them) has a run of `2^countLog2` clear
    /// bits aligned to its size.
    private static func hasClearAlignedRun(_ bits: UInt64, units: Int, countLog2: Int) -> Bool {
        let count = 1 << countLog2
        guard count <= units else { return false }
        let mask: UInt64 = count == 64 ? ~0 : (1 << UInt64(count)) - 1
        return stride(from: 0, to: units, by: count).contains { bits >> UInt64($0) & mask == 0 }
    }

    /// The spans of a section header that are not empty, a bit each.
    private static func usedSpans(_ header: SectionHeader) -> UInt64 {
        (0..<PoolGeometry.spansPerSection).reduce(0) { used, span in header.state(ofSpan: span) == .empty ? used : used | 1 << UInt64(span) }
    }

    /// Bit `k` set: the pool has room for `2^k` chunks now.
    private func roomMask(_ pool: Pool) -> UInt64 {
        let geometry = pool.geometry
        var mask: UInt64 = 0
        var emptySections: [Bool] = []
        emptySections.reserveCapacity(geometry.sectionCount)
        for index in 0..<geometry.sectionCount {
            guard let header = section(pool, index) else {
                emptySections.append(false)
                continue
            }
            let used = Self.usedSpans(header)
            emptySections.append(used == 0)
            // The section layer: aligned runs of empty entries.
            for countLog2 in 0...SectionHeader.countLog2Max
            where mask & (1 << UInt64(countLog2 + 5)) == 0 && Self.hasClearAlignedRun(used, units: PoolGeometry.spansPerSection, countLog2: countLog2) {
                mask |= 1 << UInt64(countLog2 + 5)
            }
            // The chunk layer: an empty entry, or an open span with a free aligned run.
            if used != 0xFFFF { mask |= 0x1F }
            guard mask & 0x1F != 0x1F else { continue }
            for spanIndex in 0..<PoolGeometry.spansPerSection where header.state(ofSpan: spanIndex).isChunkMode {
                guard let spanHeader = span(pool, index, spanIndex), spanHeader.mode == .open else { continue }
                for countLog2 in 0...SpanHeader.countLog2Max
                where Self.hasClearAlignedRun(UInt64(spanHeader.bitmap), units: PoolGeometry.chunksPerSpan, countLog2: countLog2) {
                    mask |= 1 << UInt64(countLog2)
                }
            }
        }
        // Runs of whole sections, aligned to their size.
        var countLog2 = 1
        while 1 << countLog2 <= geometry.sectionCount {
            let count = 1 << countLog2
            if stride(from: 0, through: geometry.sectionCount - count, by: count).contains(where: { first in
                emptySections[first..<first + count].allSatisfy { $0 }
            }) {
                mask |= 1 << UInt64(Block.sectionLayerCountLog2Max + countLog2)
            }
            countLog2 += 1
        }
        return mask
    }

    private func hasRoom(_ pool: Pool, chunkCountLog2: Int) -> Bool {
        chunkCountLog2 < 64 && roomMask(pool) & (1 << UInt64(chunkCountLog2)) != 0
    }

    /// Where `pool` has room for `2^chunkCountLog2` chunks now, in words; nil when nowhere.
    private func room(_ pool: Pool, chunkCountLog2: Int) -> String? {
        let geometry = pool.geometry
        switch Block.layer(chunkCountLog2: chunkCountLog2) {
        case .chunk:
            for index in 0..<geometry.sectionCount {
                guard let header = section(pool, index) else { continue }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    let state = header.state(ofSpan: spanIndex)
                    if state == .empty { return "section \(index) span \(spanIndex) is empty (section header \(hex(header.rawValue)))" }
                    guard state.isChunkMode, let spanHeader = span(pool, index, spanIndex), spanHeader.mode == .open,
                          Self.hasClearAlignedRun(UInt64(spanHeader.bitmap), units: PoolGeometry.chunksPerSpan, countLog2: chunkCountLog2)
                    else { continue }
                    return "span \(index).\(spanIndex) is open with bitmap \(hex(UInt64(spanHeader.bitmap))) (span header \(hex(spanHeader.rawValue)))"
                }
            }
        case .section:
            for index in 0..<geometry.sectionCount {
                guard let header = section(pool, index),
                      Self.hasClearAlignedRun(Self.usedSpans(header), units: PoolGeometry.spansPerSection, countLog2: chunkCountLog2 - 5)
                else { continue }
                return "section \(index) has \(1 << (chunkCountLog2 - 5)) aligned empty spans (section header \(hex(header.rawValue)))"
            }
        case .multiSection:
            let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
            for first in stride(from: 0, through: geometry.sectionCount - count, by: count)
            where (first..<first + count).allSatisfy({ section(pool, $0).map { Self.usedSpans($0) == 0 } ?? false }) {
                return "sections \(first)..<\(first + count) are empty"
            }
        }
        return nil
    }

    private func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
}

import FineMem

/// The recovery benchmark: a dead compute node holding about `blocks` blocks of mixed
/// sizes on one memory node is fenced and recovered through the memory node's loopback.
///
/// The dead node's holdings are laid down as a pool image written through a NIC
/// connection (not allocated one by one, which would take minutes): sections in chunk
/// mode whose spans are full of 4, 8 and 16 KiB blocks (22 blocks a span), every tenth
/// section held by 128, 256 and 512 KiB blocks, and every hundredth pair of sections a
/// 4 MiB block, each block with its full-log record, the node's slot alive as if it had
/// allocated them. Free sections are left for a live node.
///
/// Two runs: in virtual time with the latency model (the modelled figure, with a live node
/// allocating 4 KiB blocks before and during recovery for the latency rise), and in
/// immediate mode, where the wall time is the CPU work alone (recovery's own and the
/// simulated NIC's executing its verbs).
package struct RecoveryBenchmark: Sendable {
    package struct Result: Sendable {
        package var blocksHeld = 0
        package var report = RecoveryReport()
        /// Nanoseconds of the recovery: virtual (with a simulator) or wall (immediate mode).
        package var elapsedNanos: UInt64 = 0
        /// Wall nanoseconds of the recovery in immediate mode.
        package var cpuNanos: UInt64 = 0
        /// The part of `cpuNanos` spent inside the simulated NIC executing the verbs.
        package var fabricNanos: UInt64 = 0
        /// A live node's 4 KiB allocation latency (virtual ns, median) before and during recovery.
        package var liveLatencyBefore: UInt64 = 0
        package var liveLatencyDuring: UInt64 = 0
        package var liveAllocationsDuring = 0
        package var violations: [String] = []
    }

    package let blocks: Int
    package let seed: UInt64

    package init(blocks: Int, seed: UInt64 = 1) {
        self.blocks = blocks
        self.seed = seed
    }

    /// Blocks one chunk-mode section holds (16 spans of 16 x 4 KiB, 4 x 8 KiB, 2 x 16 KiB).
    static let blocksPerChunkSection = 16 * 22
    /// Section-layer blocks of a section: 8 x 128 KiB, 2 x 256 KiB, 1 x 512 KiB.
    static let sectionRuns: [HeaderRun] = (0..<8).map { HeaderRun(offset: $0, countLog2: 0) }
        + [HeaderRun(offset: 8, countLog2: 1), HeaderRun(offset: 10, countLog2: 1), HeaderRun(offset: 12, countLog2: 2)]
    static let chunkRuns: [HeaderRun] = (0..<16).map { HeaderRun(offset: $0, countLog2: 0) }
        + (0..<4).map { HeaderRun(offset: 16 + 2 * $0, countLog2: 1) } + [HeaderRun(offset: 24, countLog2: 2), HeaderRun(offset: 28, countLog2: 2)]

    /// The kind of each section of the dead node's part of the pool.
    enum SectionKind { case chunks, sectionBlocks, multiFirst, multiRest }

    var plan: [SectionKind] {
        var kinds: [SectionKind] = []
        var held = 0
        while held < blocks {
            if kinds.count % 100 == 98 {
                kinds += [.multiFirst, .multiRest]
                held += 1
            } else if kinds.count % 10 == 9 {
                kinds.append(.sectionBlocks)
                held += Self.sectionRuns.count
            } else {
                kinds.append(.chunks)
                held += Self.blocksPerChunkSection
            }
        }
        if kinds.count % 2 == 1 { kinds.append(.chunks) }
        return kinds
    }

    package func run() async -> Result {
        var result = Result()
        let plan = plan
        result.blocksHeld = plan.reduce(0) { count, kind in
            switch kind {
            case .chunks: count + Self.blocksPerChunkSection
            case .sectionBlocks: count + Self.sectionRuns.count
            case .multiFirst: count + 1
            case .multiRest: count
            }
        }
        let virtual = Locked(result)
        let simulator = Simulator(seed: seed)
        simulator.spawn { await Self.drive(plan: plan, simulator: simulator, result: virtual) }
        simulator.run()
        result = virtual.withLock { $0 }
        let immediate = Locked(Result())
        await Self.drive(plan: plan, simulator: nil, result: immediate)
        let cpu = immediate.withLock { $0 }
        result.cpuNanos = cpu.elapsedNanos
        result.fabricNanos = cpu.fabricNanos
        result.violations += cpu.violations.map { "immediate mode: \($0)" }
        return result
    }

    private static let freeSections = 64

    private static func drive(plan: [SectionKind], simulator: Simulator?, result: Locked<Result>) async {
        func note(_ problem: String) { result.withLock { $0.violations.append(problem) } }
        let runtime: any Runtime = simulator ?? SystemRuntime.shared
        let cluster: EmbeddedCluster
        var configuration = EmbeddedCluster.Configuration(
            memoryNodes: 1, poolBytesPerNode: UInt64(plan.count + freeSections) * PoolGeometry.sectionBytes, computeNodes: 2)
        configuration.failureDetection = false
        do { cluster = try await EmbeddedCluster.start(configuration, simulator: simulator) } catch {
            note("cluster did not start: \(error)")
            return
        }
        let dead = cluster.computeNodes[0]
        let live = cluster.computeNodes[1]
        let memoryNode = cluster.memoryNodes[0]
        do {
            try await layDown(plan, owner: dead.owner, memoryNode: memoryNode)
        } catch {
            note("laying down the pool: \(error)")
            return
        }
        // The live node's 4 KiB allocations before recovery: the baseline.
        var before: [UInt64] = []
        var held: [Block] = []
        for _ in 0..<200 {
            let start = runtime.nowNanoseconds
            guard let block = try? await live.allocate(chunkCountLog2: 0, application: ApplicationID(2)) else { note("live allocation failed"); return }
            before.append(runtime.nowNanoseconds - start)
            held.append(block)
        }
        do { try await cluster.fence(computeNode: 0) } catch {
            note("fence: \(error)")
            return
        }
        let recovering = Locked(true)
        let during = Locked<[UInt64]>([])
        if let simulator {
            simulator.spawn {
                while recovering.withLock({ $0 }) {
                    let start = simulator.nowNanoseconds
                    guard let block = try? await live.allocate(chunkCountLog2: 0, application: ApplicationID(2)) else { return }
                    during.withLock { $0.append(simulator.nowNanoseconds - start) }
                    try? await live.free(block, application: ApplicationID(2))
                }
            }
        }
        let start = runtime.nowNanoseconds
        do {
            let report: RecoveryReport
            if simulator == nil {
                // Immediate mode: time the NIC's part apart from recovery's own.
                var timed: TimedConnection?
                let access = try memoryNode.recoveryAccess(for: dead.owner, from: NodeID(991)).interposing { connection in
                    let timing = TimedConnection(connection)
                    timed = timing
                    return timing
                }
                report = try await PoolRecovery(access: access, runtime: runtime).run()
                try memoryNode.revoke(access)
                result.withLock { $0.fabricNanos = timed?.nanoseconds ?? 0 }
            } else {
                report = try await memoryNode.recover(computeNode: dead.owner, runtime: runtime)
            }
            let elapsed = runtime.nowNanoseconds - start
            recovering.withLock { $0 = false }
            result.withLock { result in
                result.report = report
                result.elapsedNanos = elapsed
            }
        } catch {
            recovering.withLock { $0 = false }
            note("recovery: \(error)")
            return
        }
        let expected = result.withLock { $0.blocksHeld }
        let reclaimed = result.withLock { $0.report.blocksReclaimed }
        if simulator != nil, reclaimed != expected { note("reclaimed \(reclaimed) of \(expected) blocks") }
        for block in held { try? await live.free(block, application: ApplicationID(2)) }
        await cluster.quiesce()
        if simulator != nil {
            let problems = PoolInspector(cluster: cluster).checkAtRest()
            if !problems.isEmpty { note("after recovery: \(problems.prefix(3))") }
        }
        let sortedBefore = before.sorted()
        let sortedDuring = during.withLock { $0 }.sorted()
        result.withLock { result in
            result.liveLatencyBefore = sortedBefore[sortedBefore.count / 2]
            result.liveLatencyDuring = sortedDuring.isEmpty ? 0 : sortedDuring[sortedDuring.count / 2]
            result.liveAllocationsDuring = sortedDuring.count
        }
    }

    /// Writes the dead node's holdings: headers, records, through a connection to the
    /// memory node's NIC, in doorbells of whole header arrays and record runs.
    private static func layDown(_ plan: [SectionKind], owner: OwnerID, memoryNode: MemoryNode) async throws {
        let access = try memoryNode.recoveryAccess(for: owner, from: NodeID(990))
        defer { try? memoryNode.revoke(access) }
        let (grant, connection) = (access.grant, access.connection)
        let log = TemporaryLog(offset: 0, sizeCode: 0, owner: owner, sequence: LogSequence(rawValue: 1))
        let fullSpan = SpanHeader(bitmap: ~0, mode: .open, contended: false, logPending: false, log: log).rawValue
        func record(_ chunkCountLog2: Int, _ layer: FullLogRecord.Layer) -> UInt64 {
            FullLogRecord(allocated: true, owner: owner, application: ApplicationID(1), chunkCountLog2: chunkCountLog2, layer: layer,
                          sequence: LogSequence(rawValue: 1), incarnation: 1).rawValue
        }
        var sections: [UInt64] = []
        var spans: [UInt64] = []
        var records: [UInt64] = []
        for kind in plan {
            var sectionRecords = [UInt64](repeating: 0, count: PoolGeometry.chunksPerSection)
            switch kind {
            case .chunks:
                sections.append(SectionHeader(spanStates: Array(repeating: .chunksAvoid, count: 16), contended: false, logPending: false, log: log).rawValue)
                spans += Array(repeating: fullSpan, count: 16)
                for span in 0..<16 {
                    for run in chunkRuns { sectionRecords[span * 32 + run.offset] = record(run.countLog2, .chunk) }
                }
            case .sectionBlocks:
                sections.append(SectionHeader(spanStates: Array(repeating: .whole, count: 16), contended: false, logPending: false, log: log).rawValue)
                spans += Array(repeating: SpanHeader.empty.rawValue, count: 16)
                for run in sectionRuns { sectionRecords[run.offset * 32] = record(run.countLog2 + 5, .section) }
            case .multiFirst, .multiRest:
                let multiLog = TemporaryLog(offset: 0, sizeCode: SectionHeader.multiSectionSizeCode, owner: owner, sequence: LogSequence(rawValue: 1))
                sections.append(SectionHeader(spanStates: Array(repeating: .whole, count: 16), contended: false, logPending: false, log: multiLog).rawValue)
                spans += Array(repeating: SpanHeader.empty.rawValue, count: 16)
                if kind == .multiFirst { sectionRecords[0] = record(Block.sectionLayerCountLog2Max + 1, .multiSection) }
            }
            records += sectionRecords
        }
        let key = grant.metadataKey
        func bytes(_ words: ArraySlice<UInt64>) -> [UInt8] { words.flatMap(\.littleEndianBytes) }
        _ = try await connection.post([
            .write(grant.address(of: .section(0)), bytes: bytes(sections[...]), rkey: key),
            .write(grant.address(of: .span(section: 0, span: 0)), bytes: bytes(spans[...]), rkey: key),
        ])
        let step = 1 << 17
        for start in stride(from: 0, to: records.count, by: step) {
            _ = try await connection.post([
                .write(grant.recordAddress(chunk: start), bytes: bytes(records[start..<min(start + step, records.count)]), rkey: key)
            ])
        }
    }
}

/// A connection that adds up the wall time its posts take (in immediate mode, the time the
/// simulated NIC spends executing the verbs).
private final class TimedConnection: FabricConnection, @unchecked Sendable {
    private let inner: any FabricConnection
    private let total = Locked<UInt64>(0)

    init(_ inner: any FabricConnection) { self.inner = inner }

    var remoteNode: NodeID { inner.remoteNode }
    var nanoseconds: UInt64 { total.withLock { $0 } }

    func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        let start = SystemRuntime.shared.nowNanoseconds
        defer { total.withLock { $0 += SystemRuntime.shared.nowNanoseconds - start } }
        return try await inner.post(verbs)
    }
}

/// Errors of recovering a compute node.
package enum RecoveryError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The node's slot says it is alive or suspected: it must be fenced first.
    case notFenced(OwnerID, NodeSlot.State)
    /// The fabric failed (the recoverer's connection broke): run recovery again.
    case fabric(FabricError)
    /// A metadata word is not one the protocol allows.
    case corruptMetadata(String)
    /// Passes ran out while headers stayed pending under other nodes' logs; `remaining`
    /// describes what was left.
    case notSettled(passes: Int, remaining: String)

    package var description: String {
        switch self {
        case .notFenced(let owner, let state): "\(owner) is \(state), not fenced: fence it before recovering it"
        case .fabric(let error): "fabric: \(error)"
        case .corruptMetadata(let what): "corrupt metadata: \(what)"
        case .notSettled(let passes, let remaining): "recovery did not settle after \(passes) passes; left: \(remaining)"
        }
    }
}

/// What one recovery run did on one memory node.
package struct RecoveryReport: Sendable, Hashable {
    /// Blocks of the dead node freed (each block once, whichever run freed it).
    package var blocksReclaimed = 0
    /// Blocks reclaimed, by layer (`FullLogRecord.Layer.rawValue` indexes it).
    package var blocksByLayer = [0, 0, 0]
    /// Headers whose blocks of the dead node were freed by one CAS.
    package var headersReclaimed = 0
    /// Full-log records set to freed.
    package var recordsFreed = 0
    /// Pending logs of the dead node (and of recovery in its name) cleared.
    package var logsSettled = 0
    /// Spans the dead node left opening or closing, or open and empty, that were closed.
    package var spansClosed = 0
    /// Intent records cleared.
    package var intentsCleared = 0
    /// Passes over the pool (the first reads everything; later ones only what changed).
    package var passes = 0
    /// Batches (doorbells) and verbs posted.
    package var batches: UInt64 = 0
    package var verbs: UInt64 = 0
    /// CASes that lost to another node and were retried.
    package var retries: UInt64 = 0
    /// Whether the run found the slot already free (an earlier run finished the job).
    package var alreadyRecovered = false

    package init() {}

    /// Changes made so far (a pass that adds none made no progress).
    var progress: Int { headersReclaimed + recordsFreed + logsSettled + spansClosed + intentsCleared }
}

/// Recovery of one fenced compute node on one memory node: settles every pending log it
/// left, frees every block it owned (every layer, multi-section blocks, half-done claims
/// and releases), finishes or undoes its span opens and closes, clears its intents, and
/// frees its node-table slot. Everything goes through the connection of a recoverer's
/// access (`RecoveryAccess`: the memory node's own queue pair, or one the memory node
/// granted a recoverer elsewhere) as one-sided verbs: the same code either way, never a
/// CPU store.
///
/// Recovery acts in the dead node's name, by its rules: a header that held the node's
/// blocks is committed by one CAS that frees them all and leaves a pending log naming the
/// node (`SpanHeader.reclaiming`), then the blocks' records are set to freed by CAS, then
/// the bit is cleared. Every step is a CAS decided from words read in the same run, so a
/// run that stops anywhere (the recoverer crashed, its connection broke) leaves states a
/// later run finishes: recovery is idempotent, and rerunning it after it finished does
/// nothing. Live nodes go on allocating: they wait only on the headers recovery holds
/// pending, for the two doorbells between its commit and its clear.
///
/// A CAS that loses is not tried again on the word it found: the transition was judged on
/// the words this run read (the header, the records, the section entry), and the word the
/// CAS found was not among them. The section is read again in the next pass.
///
/// Preconditions: the node is fenced (slot `dead`, or `recovering` from an earlier run):
/// nothing it posted can execute any more. One recoverer at a time per node and memory
/// node: the memory node grants the access, and granting a new one fences the earlier
/// recoverer (`MemoryNode.recoveryAccess(for:from:)`), so that a recoverer that stalled
/// and resumes changes nothing.
///
/// ```swift
/// try await memoryNode.fence(computeNode: OwnerID(3))
/// let access = try memoryNode.recoveryAccess(for: OwnerID(3), from: NodeID(1002))
/// let report = try await PoolRecovery(access: access, runtime: runtime).run()
/// try memoryNode.revoke(access)
/// ```
package final class PoolRecovery: Sendable {
    package let owner: OwnerID
    private let grant: MemoryNodeGrant
    private let connection: any FabricConnection
    private let runtime: any Runtime
    /// Passes in a row without progress (every CAS lost, or headers held under other
    /// nodes' pending logs: a stalled live node, or another dead node not recovered yet)
    /// before recovery gives up with `notSettled`, having done what it could; the caller
    /// runs it again later (the monitor does at its next check).
    private let idlePassesMax: Int
    /// Sections read in one READ of records (1 MiB of records).
    private static let sectionsPerRead = 256
    /// The pause between passes that lost a CAS or waited on another node's pending log.
    private static let pauseNanos: ClosedRange<UInt64> = 1_000...1_000_000

    package init(access: RecoveryAccess, runtime: any Runtime, idlePassesMax: Int = 64) {
        owner = access.owner
        grant = access.grant
        connection = access.connection
        self.runtime = runtime
        self.idlePassesMax = idlePassesMax
    }

    private var geometry: PoolGeometry { grant.geometry }

    /// Runs recovery to its end: takes the dead node's slot (dead to recovering), runs
    /// passes until one finds no work, syncs the room summary of the sections its CASes
    /// changed, and frees the slot (recovering to free).
    ///
    /// Preconditions: the node is fenced (its slot is dead, or recovering after a
    /// recoverer that stopped), and this recoverer holds the memory node's lease for it
    /// (`RecoveryAccess`). Postcondition on success: no header, record or intent of the
    /// pool names the node, and its slot is free.
    package func run() async throws(RecoveryError) -> RecoveryReport {
        var report = RecoveryReport()
        var trace = OperationTrace()
        if let link = try await begin(&report, trace: &trace) {
            let roomChanged = try await runPasses(on: link, &report, trace: &trace)
            try await end(on: link, roomChanged: roomChanged, trace: &trace)
        }
        report.batches = trace.batches
        report.verbs = trace.verbs
        report.retries = trace.retries
        return report
    }

    /// Syncs the room summary bits of `roomChanged`, then frees the node's slot
    /// (recovering to free).
    private func end(on link: MemoryNodeLink, roomChanged: Range<Int>?, trace: inout OperationTrace) async throws(RecoveryError) {
        let slotAddress = grant.nodeSlotAddress(owner)
        let outcome: UpdateOutcome<NodeSlot>
        do {
            if let sections = roomChanged {
                try await link.syncRoomSummary(
                    sections: sections, attemptsMax: MemoryNodeLink.roomSummarySyncAttemptsMax, backoffNanos: Self.pauseNanos, runtime: runtime, trace: &trace)
            }
            let current = try await probe(slotAddress, trace: &trace)
            outcome = try await link.update(.word(slotAddress, known: current), UpdatePolicy(attemptsMax: 4), trace: &trace) { $0.recovered() }
        } catch { throw .fabric(error) }
        guard case .updated = outcome else {
            throw .corruptMetadata("the slot of \(owner) changed during its recovery: \(outcomeWord(outcome))")
        }
    }

    /// Reads the dead node's slot and takes it (dead to recovering); answers the link that
    /// acts in the node's name, or nil when the slot is free (recovered already).
    private func begin(_ report: inout RecoveryReport, trace: inout OperationTrace) async throws(RecoveryError) -> MemoryNodeLink? {
        let slotAddress = grant.nodeSlotAddress(owner)
        let slotWord: UInt64
        do { slotWord = try await probe(slotAddress, trace: &trace) } catch { throw .fabric(error) }
        guard let slot = NodeSlot(rawValue: slotWord) else { throw .corruptMetadata("node slot of \(owner): \(slotWord)") }
        switch slot.state {
        case .free:
            report.alreadyRecovered = true
            return nil
        case .alive, .suspected:
            throw .notFenced(owner, slot.state)
        case .dead, .recovering:
            break
        }
        let link = MemoryNodeLink.acting(for: owner, incarnation: slot.incarnation, grant: grant, connection: connection)
        if slot.state == .dead {
            let outcome: UpdateOutcome<NodeSlot>
            do {
                outcome = try await link.update(.word(slotAddress, known: slotWord), UpdatePolicy(attemptsMax: 4), trace: &trace) { $0.recovering() }
            } catch { throw .fabric(error) }
            guard case .updated = outcome else { throw .notFenced(owner, NodeSlot(rawValue: outcomeWord(outcome))?.state ?? .free) }
        }
        return link
    }

    /// Runs passes (`RecoveryPass`) until one finds no work; answers the sections whose
    /// room recovery's CASes changed (their summary bits are synced before the node is
    /// declared recovered; a recovery that dies first leaves them stale, a hint that the
    /// next full refresh mends). Bounded by `idlePassesMax` passes in a row without
    /// progress; every other pass changes at least one word of the dead node's, of which
    /// there are finitely many.
    private func runPasses(on link: MemoryNodeLink, _ report: inout RecoveryReport, trace: inout OperationTrace) async throws(RecoveryError) -> Range<Int>? {
        var roomChanged = LinkEffects()
        var pool = PoolImage(geometry: geometry)
        var dirty = Array(0..<geometry.sectionCount)
        var pause = Pause(Self.pauseNanos)
        var idlePasses = 0
        while true {
            report.passes += 1
            do { try await read(dirty, into: &pool, trace: &trace) } catch { throw .fabric(error) }
            pool.indexMultiSectionBlocks(of: owner)
            var pass = RecoveryPass(owner: owner, pool: pool, sections: dirty)
            guard idlePasses <= idlePassesMax else { throw .notSettled(passes: report.passes, remaining: pass.remainingWork) }
            guard pass.hasWork else { return roomChanged.roomChanged }
            let retriesBefore = trace.retries
            let progressBefore = report.progress
            do {
                try await pass.reclaim(on: link, report: &report, trace: &trace)
                try await pass.settle(on: link, report: &report, trace: &trace)
                try await pass.closeSpans(on: link, report: &report, trace: &trace)
                try await pass.clearIntents(on: link, report: &report, trace: &trace)
            } catch { throw .fabric(error) }
            let effects = trace.effects.take()
            assert(effects.returnedLogs.isEmpty, "recovery has no logs of its own to give back")
            if let sections = effects.roomChanged { roomChanged.noteRoomChanged(sections) }
            pool = pass.pool
            dirty = pass.touched
            idlePasses = report.progress == progressBefore ? idlePasses + 1 : 0
            if trace.retries > retriesBefore || pass.waited {
                await pause.sleep(on: runtime)
            } else {
                pause = Pause(Self.pauseNanos)
            }
        }
    }

    private func outcomeWord<Word: MetadataWord>(_ outcome: UpdateOutcome<Word>) -> UInt64 {
        switch outcome {
        case .updated(let word), .committed(let word, _): word.rawValue
        case .refused(let current), .lost(let current): current
        }
    }

    private func probe(_ address: RemoteAddress, trace: inout OperationTrace) async throws(FabricError) -> UInt64 {
        trace.batches += 1
        trace.verbs += 1
        return try await connection.post([.readWords(address, count: 1, rkey: grant.metadataKey)])[0].words[0]
    }

    /// Reads the headers and records of `sections`, and the dead node's intents, in as few
    /// doorbells as the READ size allows (one per `sectionsPerRead` sections, 64 READs a
    /// doorbell).
    private func read(_ sections: [Int], into pool: inout PoolImage, trace: inout OperationTrace) async throws(FabricError) {
        var ranges: [Range<Int>] = []
        for section in sections {
            if let last = ranges.last, last.upperBound == section, last.count < Self.sectionsPerRead {
                ranges[ranges.count - 1] = last.lowerBound..<section + 1
            } else {
                ranges.append(section..<section + 1)
            }
        }
        let key = grant.metadataKey
        var verbs: [Verb] = [.readWords(grant.intentAddress(owner: owner, slot: 0), count: geometry.intentSlotsPerNode, rkey: key)]
        var pieces: [Range<Int>] = []
        func flush() async throws(FabricError) {
            trace.batches += 1
            trace.verbs += UInt64(verbs.count)
            let results = try await connection.post(verbs)
            var index = 0
            if case .read = verbs[0], verbs[0].address == grant.intentAddress(owner: owner, slot: 0) {
                pool.intents = results[0].words
                index = 1
            }
            for range in pieces {
                pool.store(sections: range, headers: results[index].words, spans: results[index + 1].words, records: results[index + 2].words)
                index += 3
            }
            verbs = []
            pieces = []
        }
        for range in ranges {
            verbs.append(.readWords(grant.address(of: .section(range.lowerBound)), count: range.count, rkey: key))
            verbs.append(.readWords(grant.address(of: .span(section: range.lowerBound, span: 0)), count: range.count * PoolGeometry.spansPerSection, rkey: key))
            verbs.append(.readWords(grant.recordAddress(chunk: range.lowerBound * PoolGeometry.chunksPerSection),
                                    count: range.count * PoolGeometry.chunksPerSection, rkey: key))
            pieces.append(range)
            if verbs.count >= 64 { try await flush() }
        }
        if !verbs.isEmpty { try await flush() }
    }
}

/// Recovery's image of one pool: every header and record word as last read or as its own
/// CASes answered, and the dead node's multi-section blocks by section.
struct PoolImage: Sendable {
    var sections: [UInt64]
    var spans: [UInt64]
    var records: [UInt64]
    var intents: [UInt64] = []
    /// For each section inside a multi-section block of the dead node: the block's first
    /// section and section count.
    var multiSectionBlock: [Int: Range<Int>] = [:]

    init(geometry: PoolGeometry) {
        sections = Array(repeating: 0, count: geometry.sectionCount)
        spans = Array(repeating: 0, count: geometry.spanCount)
        records = Array(repeating: 0, count: geometry.chunkCount)
    }

    mutating func store(sections range: Range<Int>, headers: [UInt64], spans spanWords: [UInt64], records recordWords: [UInt64]) {
        sections.replaceSubrange(range, with: headers)
        let spansPerSection = PoolGeometry.spansPerSection
        spans.replaceSubrange(range.lowerBound * spansPerSection..<range.upperBound * spansPerSection, with: spanWords)
        let chunksPerSection = PoolGeometry.chunksPerSection
        records.replaceSubrange(range.lowerBound * chunksPerSection..<range.upperBound * chunksPerSection, with: recordWords)
    }

    subscript(slot: HeaderSlot) -> UInt64 {
        get {
            switch slot {
            case .section(let section): sections[section]
            case .span(let section, let span): spans[section * PoolGeometry.spansPerSection + span]
            }
        }
        set {
            switch slot {
            case .section(let section): sections[section] = newValue
            case .span(let section, let span): spans[section * PoolGeometry.spansPerSection + span] = newValue
            }
        }
    }

    /// The size (log2 of chunks) of the block whose record at `chunk` is an allocation by
    /// `owner` in `layer`, if it is one: a mask and a compare on the raw word, as recovery
    /// asks this of every record of the pool.
    func allocation(at chunk: Int, by owner: OwnerID, layer: FullLogRecord.Layer) -> Int? {
        let word = records[chunk]
        var expected: UInt64 = 0
        FullLogRecord.ownerField.set(&expected, UInt64(owner.rawValue))
        FullLogRecord.allocatedField.set(&expected, 1)
        FullLogRecord.layerField.set(&expected, layer.rawValue)
        guard word & Self.recordMatchMask == expected else { return nil }
        return Int(FullLogRecord.sizeField.get(word))
    }

    /// The record fields `allocation(at:by:layer:)` compares: owner, allocated, layer, and
    /// the reserved bits (which must be zero).
    private static let recordMatchMask = FullLogRecord.ownerField.mask | FullLogRecord.allocatedField.mask
        | FullLogRecord.layerField.mask | FullLogRecord.reservedField.mask

    /// The record at `chunk`, decoded.
    func record(at chunk: Int) -> FullLogRecord? { FullLogRecord(rawValue: records[chunk]) }

    /// Indexes the multi-section blocks of `owner`, afresh, from the records as last read
    /// or as recovery's own record CASes left them. Only recovery changes a record of the
    /// dead node, so a record the image shows allocated to it still is; one it freed is
    /// dropped here, and its sections, which others may claim from then on, are never
    /// again taken for the dead node's.
    mutating func indexMultiSectionBlocks(of owner: OwnerID) {
        multiSectionBlock.removeAll(keepingCapacity: true)
        for section in 0..<sections.count {
            let chunk = section * PoolGeometry.chunksPerSection
            guard let chunkCountLog2 = allocation(at: chunk, by: owner, layer: .multiSection) else { continue }
            let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
            let range = section..<min(section + count, sections.count)
            for member in range { multiSectionBlock[member] = range }
        }
    }
}

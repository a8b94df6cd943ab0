/// One pass of recovery over the sections it read: four steps, each one doorbell (or two)
/// of CASes decided from the pool image and answered back into it.
///
/// 1. Reclaim: every header holding blocks of the dead node commits their free in one CAS
///    (one section-layer block a CAS), pending under a log naming the node.
/// 2. Settle: for every header pending under the node's log whose blocks are all free,
///    the records of those blocks are set to freed by CAS (one doorbell), then the bit is
///    cleared (the next). A multi-section block's record is written once every section of
///    it is free and its first section is pending; its sections are cleared after it.
/// 3. Close spans: an open span the node emptied and did not close goes to `closing`; the
///    section entry of a span the node left `opening` or `closing` goes back to empty;
///    then such a span, its entry no longer in chunk mode, goes to `closed` (L6 order).
/// 4. Intents: an intent of the node is cleared once no section of its run is pending
///    under the node's multi-section log.
///
/// A step whose CAS loses leaves the header for the next pass (`touched`), which reads it
/// again: nothing is decided from a word that changed.
struct RecoveryPass {
    /// The most verbs recovery puts in one doorbell (a send queue's depth, not the pool's).
    static let verbsPerDoorbellMax = 1_024

    let owner: OwnerID
    private(set) var pool: PoolImage
    let sections: [Int]
    /// Sections to read again in the next pass: those with work found in this one.
    private var touchedSet: Set<Int> = []
    /// Whether a header of the dead node's was held by another node's pending log.
    private(set) var waited = false

    init(owner: OwnerID, pool: PoolImage, sections: [Int]) {
        self.owner = owner
        self.pool = pool
        self.sections = sections
        for section in sections where hasWork(in: section) { touch(section) }
        for intent in liveIntents { for section in intent.sections where section < pool.sections.count { touchedSet.insert(section) } }
    }

    var hasWork: Bool { !touchedSet.isEmpty || !liveIntents.isEmpty }

    /// What is left, for an error message: the first sections with work, their headers.
    var remainingWork: String {
        let sections = touched.prefix(4).map { index in
            let spans = (0..<PoolGeometry.spansPerSection).map { span(index, $0) }.enumerated()
                .filter { $0.element.rawValue != SpanHeader.empty.rawValue }
                .map { "\($0.offset): \($0.element.mode) bitmap \(String($0.element.bitmap, radix: 16)) pending \($0.element.logPending) by \($0.element.log.owner)" }
            let header = section(index)
            return "section \(index) \(header.spanStates) pending \(header.logPending) by \(header.log.owner) code \(header.log.sizeCode); spans [\(spans.joined(separator: "; "))]"
        }
        return sections.joined(separator: " | ") + " intents \(liveIntents)"
    }
    var touched: [Int] { touchedSet.sorted() }

    private mutating func touch(_ section: Int) {
        touchedSet.insert(section)
        if let range = pool.multiSectionBlock[section] { touchedSet.formUnion(range) }
    }

    // MARK: What the dead node holds

    private var liveIntents: [IntentRecord] {
        pool.intents.compactMap { IntentRecord(rawValue: $0) }.filter { $0.isValid && $0.owner == owner }
    }

    private func span(_ section: Int, _ span: Int) -> SpanHeader { SpanHeader(rawValue: pool[.span(section: section, span: span)]) ?? .empty }
    private func section(_ section: Int) -> SectionHeader { SectionHeader(rawValue: pool[.section(section)]) ?? .empty }

    private func isPendingByOwner<Header: LoggedHeader>(_ header: Header) -> Bool { header.logPending && header.log.owner == owner }
    private func isPendingByOther<Header: LoggedHeader>(_ header: Header) -> Bool { header.logPending && header.log.owner != owner }

    /// The dead node's chunk-layer blocks in span `span` of `section`, as runs, by their records.
    private func chunkRuns(_ section: Int, _ span: Int) -> [HeaderRun] {
        let first = HeaderSlot.span(section: section, span: span).firstChunk
        var runs: [HeaderRun] = []
        for chunk in 0..<PoolGeometry.chunksPerSpan {
            guard let chunkCountLog2 = pool.allocation(at: first + chunk, by: owner, layer: .chunk) else { continue }
            let run = HeaderRun(offset: chunk, countLog2: chunkCountLog2)
            if SpanHeader.holds(run) { runs.append(run) }
        }
        return runs
    }

    /// The dead node's section-layer blocks in `section`, as runs of spans.
    private func sectionRuns(_ section: Int) -> [HeaderRun] {
        (0..<PoolGeometry.spansPerSection).compactMap { span in
            let chunk = HeaderSlot.span(section: section, span: span).firstChunk
            guard let chunkCountLog2 = pool.allocation(at: chunk, by: owner, layer: .section) else { return nil }
            let run = HeaderRun(offset: span, countLog2: chunkCountLog2 - SectionHeader.unitChunkCountLog2)
            return SectionHeader.holds(run) ? run : nil
        }
    }

    private func hasWork(in sectionIndex: Int) -> Bool {
        let header = section(sectionIndex)
        if isPendingByOwner(header) { return true }
        if sectionRuns(sectionIndex).contains(where: header.marksAllocated) { return true }
        if pool.multiSectionBlock[sectionIndex] != nil, header.isAllWhole { return true }
        for spanIndex in 0..<PoolGeometry.spansPerSection {
            let spanHeader = span(sectionIndex, spanIndex)
            if isPendingByOwner(spanHeader) { return true }
            if spanHeader.mode == .open, chunkRuns(sectionIndex, spanIndex).contains(where: spanHeader.marksAllocated) { return true }
            if spanHeader.log.owner == owner, spanHeader.mode == .opening || spanHeader.mode == .closing { return true }
            if emptiedByOwner(spanHeader, entry: header.state(ofSpan: spanIndex)) { return true }
        }
        return false
    }

    /// An open, empty span whose last block operation was the dead node's (or recovery's
    /// in its name): the node would have closed it; recovery does.
    private func emptiedByOwner(_ header: SpanHeader, entry: SectionHeader.SpanState) -> Bool {
        header.mode == .open && header.bitmap == 0 && !header.logPending && header.log.owner == owner && entry.isChunkMode
    }

    // MARK: Step 1: reclaim

    mutating func reclaim(on link: MemoryNodeLink, report: inout RecoveryReport, trace: inout OperationTrace) async throws(FabricError) {
        let work = reclaimWork()
        let (spanSlots, runsBySlot, sectionSlots, sectionRunBySlot, multi) =
            (work.spanSlots, work.runsBySlot, work.sectionSlots, work.sectionRunBySlot, work.multi)
        let owner = owner
        if !spanSlots.isEmpty {
            let before = spanSlots.map { span($0.section, spanIndex($0)) }
            let outcomes: [UpdateOutcome<SpanHeader>] = try await link.updateEachInDoorbells(
                spanSlots, UpdatePolicy(attemptsMax: 1), known: spanSlots.map { pool[$0] }, trace: &trace
            ) { slot, header in header.reclaiming(runsBySlot[slot] ?? [], of: owner) }
            for (index, (slot, outcome)) in zip(spanSlots, outcomes).enumerated() {
                store(outcome, at: slot)
                if let after = outcome.committedWord {
                    // Postcondition: the dead node's blocks here are free, under its pending log.
                    precondition(isPendingByOwner(after) && !(runsBySlot[slot] ?? []).contains(where: after.marksAllocated),
                                 "a reclaim of \(slot) left \(after)")
                    report.headersReclaimed += 1
                    let freed = freedRuns(runsBySlot[slot] ?? [], before[index], after)
                    report.blocksReclaimed += freed
                    report.blocksByLayer[Int(FullLogRecord.Layer.chunk.rawValue)] += freed
                }
            }
        }
        if !sectionSlots.isEmpty {
            let outcomes: [UpdateOutcome<SectionHeader>] = try await link.updateEachInDoorbells(
                sectionSlots, UpdatePolicy(attemptsMax: 1), known: sectionSlots.map { pool[$0] }, trace: &trace
            ) { slot, header in header.reclaiming(sectionRunBySlot[slot], inMultiSectionBlock: multi.contains(slot), of: owner) }
            for (slot, outcome) in zip(sectionSlots, outcomes) {
                store(outcome, at: slot)
                guard let after = outcome.committedWord else { continue }
                precondition(isPendingByOwner(after), "a reclaim of \(slot) left \(after) without the dead node's log")
                report.headersReclaimed += 1
                if multi.contains(slot) {
                    if pool.multiSectionBlock[slot.section]?.lowerBound == slot.section {
                        report.blocksReclaimed += 1
                        report.blocksByLayer[Int(FullLogRecord.Layer.multiSection.rawValue)] += 1
                    }
                } else {
                    report.blocksReclaimed += 1
                    report.blocksByLayer[Int(FullLogRecord.Layer.section.rawValue)] += 1
                }
            }
        }
    }

    /// What step 1 does: the span and section headers holding blocks of the dead node,
    /// with the runs each CAS frees.
    private struct ReclaimWork {
        var spanSlots: [HeaderSlot] = []
        var runsBySlot: [HeaderSlot: [HeaderRun]] = [:]
        var sectionSlots: [HeaderSlot] = []
        var sectionRunBySlot: [HeaderSlot: HeaderRun] = [:]
        /// Sections of a multi-section block of the dead node.
        var multi: Set<HeaderSlot> = []
    }

    /// Step 1's work, from the pool image; notes a header held by another node's pending
    /// log (`waited`).
    private mutating func reclaimWork() -> ReclaimWork {
        var work = ReclaimWork()
        for sectionIndex in touched {
            let header = section(sectionIndex)
            let slot = HeaderSlot.section(sectionIndex)
            let run = sectionRuns(sectionIndex).first(where: header.marksAllocated)
            let inMulti = pool.multiSectionBlock[sectionIndex] != nil
            if header.reclaiming(run, inMultiSectionBlock: inMulti, of: owner) != nil {
                work.sectionSlots.append(slot)
                work.sectionRunBySlot[slot] = run
                if inMulti { work.multi.insert(slot) }
            } else if isPendingByOther(header), run != nil || inMulti {
                waited = true
            }
            for spanIndex in 0..<PoolGeometry.spansPerSection {
                let spanHeader = span(sectionIndex, spanIndex)
                let runs = chunkRuns(sectionIndex, spanIndex)
                let slot = HeaderSlot.span(section: sectionIndex, span: spanIndex)
                if spanHeader.reclaiming(runs, of: owner) != nil {
                    work.spanSlots.append(slot)
                    work.runsBySlot[slot] = runs
                } else if isPendingByOther(spanHeader), runs.contains(where: spanHeader.marksAllocated) {
                    waited = true
                }
            }
        }
        return work
    }

    private func spanIndex(_ slot: HeaderSlot) -> Int {
        guard case .span(_, let span) = slot else { preconditionFailure("\(slot) is not a span") }
        return span
    }

    /// Blocks a reclaiming CAS freed: the dead node's runs in use before and free after,
    /// and the run of its pending allocation if no record names it yet.
    private func freedRuns(_ runs: [HeaderRun], _ before: SpanHeader, _ after: SpanHeader) -> Int {
        var freed = runs.filter { before.marksAllocated($0) && after.marksFree($0) }.count
        if isPendingByOwner(before), before.logDescribesAllocation, after.marksFree(before.log.run), !runs.contains(before.log.run) { freed += 1 }
        return freed
    }

    private mutating func store<Header: LoggedHeader>(_ outcome: UpdateOutcome<Header>, at slot: HeaderSlot) {
        switch outcome {
        case .updated(let word), .committed(let word, _): pool[slot] = word.rawValue
        case .refused(let current), .lost(let current): pool[slot] = current
        }
    }

    // MARK: Step 2: settle

    mutating func settle(on link: MemoryNodeLink, report: inout RecoveryReport, trace: inout OperationTrace) async throws(FabricError) {
        var work = settleWork()
        guard !work.spanClears.isEmpty || !work.sectionClears.isEmpty else { return }
        let failedRecords = try await freeRecords(work.recordWrites, on: link, report: &report, trace: &trace)
        // A record that did not take keeps its header pending: the next pass reads both again.
        let blocked = Set(failedRecords.map { $0 / PoolGeometry.chunksPerSection })
        work.spanClears.removeAll { blocked.contains($0.section) }
        work.sectionClears.removeAll { blocked.contains($0.section) }
        let sequences = Dictionary(uniqueKeysWithValues: (work.spanClears + work.sectionClears).map { ($0, logSequence(of: $0)) })
        let owner = owner
        if !work.spanClears.isEmpty {
            let outcomes: [UpdateOutcome<SpanHeader>] = try await link.updateEachInDoorbells(
                work.spanClears, UpdatePolicy(attemptsMax: 1), known: work.spanClears.map { pool[$0] }, trace: &trace
            ) { slot, header in header.isPending(by: owner, sequence: sequences[slot]!) ? header.flushed() : nil }
            for (slot, outcome) in zip(work.spanClears, outcomes) {
                store(outcome, at: slot)
                guard let after = outcome.committedWord else { continue }
                precondition(!after.logPending, "a settle of \(slot) left its log pending")
                report.logsSettled += 1
            }
        }
        if !work.sectionClears.isEmpty {
            let outcomes: [UpdateOutcome<SectionHeader>] = try await link.updateEachInDoorbells(
                work.sectionClears, UpdatePolicy(attemptsMax: 1), known: work.sectionClears.map { pool[$0] }, trace: &trace
            ) { slot, header in header.isPending(by: owner, sequence: sequences[slot]!) ? header.flushed() : nil }
            for (slot, outcome) in zip(work.sectionClears, outcomes) {
                store(outcome, at: slot)
                guard let after = outcome.committedWord else { continue }
                precondition(!after.logPending, "a settle of \(slot) left its log pending")
                report.logsSettled += 1
            }
        }
    }

    /// What step 2 does: the records to set to freed, then the span and section headers
    /// whose pending bits to clear (a multi-section block's sections after its record).
    private struct SettleWork {
        var recordWrites: [(chunk: Int, expected: UInt64, desired: UInt64)] = []
        var spanClears: [HeaderSlot] = []
        var sectionClears: [HeaderSlot] = []
    }

    /// Step 2's work, from the pool image: every header pending under the dead node's log
    /// whose blocks are all free.
    private func settleWork() -> SettleWork {
        var work = SettleWork()
        var clearAfterRecord: [Int: [HeaderSlot]] = [:]
        var multiDone: Set<Int> = []
        for sectionIndex in touched {
            settleSpans(of: sectionIndex, into: &work)
            let header = section(sectionIndex)
            guard isPendingByOwner(header) else { continue }
            if let range = pool.multiSectionBlock[sectionIndex] {
                // Written once for the block, from its first section, after every section is free.
                guard range.lowerBound == sectionIndex, !multiDone.contains(sectionIndex) else { continue }
                let sectionsOfBlock = range.map { self.section($0) }
                guard !sectionsOfBlock.contains(where: \.isAllWhole),
                      !sectionsOfBlock.contains(where: isPendingByOther) else { continue }
                multiDone.insert(sectionIndex)
                freedRecord(HeaderSlot.section(sectionIndex).firstChunk, layer: .multiSection, sequence: header.log.sequence, into: &work)
                clearAfterRecord[sectionIndex] = range.filter { isPendingByOwner(self.section($0)) }.map(HeaderSlot.section)
                continue
            }
            if header.log.sizeCode == SectionHeader.multiSectionSizeCode {
                // Part of a claim whose record was never written (or a rolled-back one).
                if !header.isAllWhole { work.sectionClears.append(.section(sectionIndex)) }
                continue
            }
            guard !header.logDescribesAllocation else { continue }
            if let run = sectionRuns(sectionIndex).first(where: { $0 == header.log.run }), header.marksFree(run) {
                freedRecord(HeaderSlot.span(section: sectionIndex, span: run.offset).firstChunk, layer: .section, sequence: header.log.sequence, into: &work)
            }
            work.sectionClears.append(.section(sectionIndex))
        }
        for first in clearAfterRecord.keys.sorted() { work.sectionClears += clearAfterRecord[first]! }
        return work
    }

    /// Step 2's work on the span headers of one section: each pending under the dead
    /// node's log of a free, with no block of the node left, has its records freed and
    /// its bit cleared.
    private func settleSpans(of sectionIndex: Int, into work: inout SettleWork) {
        for spanIndex in 0..<PoolGeometry.spansPerSection {
            let header = span(sectionIndex, spanIndex)
            guard isPendingByOwner(header), !header.logDescribesAllocation else { continue }
            let runs = chunkRuns(sectionIndex, spanIndex)
            guard !runs.contains(where: header.marksAllocated) else { continue }
            let first = HeaderSlot.span(section: sectionIndex, span: spanIndex).firstChunk
            for run in runs where header.marksFree(run) { freedRecord(first + run.offset, layer: .chunk, sequence: header.log.sequence, into: &work) }
            work.spanClears.append(.span(section: sectionIndex, span: spanIndex))
        }
    }

    /// Adds the write of `chunk`'s record as freed, when it records an allocation of the
    /// dead node in `layer`.
    private func freedRecord(_ chunk: Int, layer: FullLogRecord.Layer, sequence: LogSequence, into work: inout SettleWork) {
        guard pool.allocation(at: chunk, by: owner, layer: layer) != nil, let freed = pool.record(at: chunk)?.freed(sequence: sequence) else { return }
        work.recordWrites.append((chunk, pool.records[chunk], freed.rawValue))
    }

    /// Sets the records of `writes` to freed, one CAS each, in doorbells of at most
    /// `verbsPerDoorbellMax`; answers the chunks whose CAS lost.
    private mutating func freeRecords(
        _ writes: [(chunk: Int, expected: UInt64, desired: UInt64)], on link: MemoryNodeLink, report: inout RecoveryReport,
        trace: inout OperationTrace
    ) async throws(FabricError) -> Set<Int> {
        var failed: Set<Int> = []
        var outcomes: [UpdateOutcome<RawWord>] = []
        for start in stride(from: 0, to: writes.count, by: Self.verbsPerDoorbellMax) {
            let batch = writes[start..<min(start + Self.verbsPerDoorbellMax, writes.count)]
            outcomes += try await link.updateEach(
                words: batch.map { (link.grant.recordAddress(chunk: $0.chunk), $0.expected) }, UpdatePolicy(attemptsMax: 1), trace: &trace
            ) { offset, _ in writes[start + offset].desired }
        }
        for (write, outcome) in zip(writes, outcomes) {
            switch outcome {
            case .updated, .committed:
                pool.records[write.chunk] = write.desired
                report.recordsFreed += 1
            case .lost(let current), .refused(let current):
                pool.records[write.chunk] = current
                failed.insert(write.chunk)
            }
        }
        return failed
    }

    private func logSequence(of slot: HeaderSlot) -> LogSequence {
        switch slot {
        case .section(let index): section(index).log.sequence
        case .span(let index, let spanIndex): span(index, spanIndex).log.sequence
        }
    }

    // MARK: Step 3: spans

    mutating func closeSpans(on link: MemoryNodeLink, report: inout RecoveryReport, trace: inout OperationTrace) async throws(FabricError) {
        let owner = owner
        // Open spans the node emptied: to closing (they then take the path below).
        let emptied = touched.flatMap { sectionIndex in
            (0..<PoolGeometry.spansPerSection).filter { emptiedByOwner(span(sectionIndex, $0), entry: section(sectionIndex).state(ofSpan: $0)) }
                .map { HeaderSlot.span(section: sectionIndex, span: $0) }
        }
        if !emptied.isEmpty {
            let outcomes: [UpdateOutcome<SpanHeader>] = try await link.updateEachInDoorbells(
                emptied, UpdatePolicy(attemptsMax: 1), known: emptied.map { pool[$0] }, trace: &trace
            ) { _, header in header.log.owner == owner ? header.closing() : nil }
            for (slot, outcome) in zip(emptied, outcomes) {
                store(outcome, at: slot)
                if let after = outcome.committedWord { precondition(isIntermediate(after), "closing \(slot) left \(after)") }
            }
        }
        // Section entries in chunk mode over spans the node left opening or closing: to empty.
        var entries: [HeaderSlot: [Int]] = [:]
        for sectionIndex in touched {
            let header = section(sectionIndex)
            for spanIndex in 0..<PoolGeometry.spansPerSection where isIntermediate(span(sectionIndex, spanIndex)) && header.state(ofSpan: spanIndex).isChunkMode {
                entries[.section(sectionIndex), default: []].append(spanIndex)
            }
        }
        if !entries.isEmpty {
            let slots = entries.keys.sorted { $0.section < $1.section }
            let outcomes: [UpdateOutcome<SectionHeader>] = try await link.updateEachInDoorbells(
                slots, UpdatePolicy(attemptsMax: 1), known: slots.map { pool[$0] }, trace: &trace
            ) { slot, header in
                var changed = header
                for spanIndex in entries[slot]! { changed = changed.closingSpan(spanIndex) ?? changed }
                return changed == header ? nil : changed
            }
            for (slot, outcome) in zip(slots, outcomes) {
                store(outcome, at: slot)
                if let after = outcome.committedWord {
                    // Postcondition: no chunk-mode entry over a span the node left intermediate (L6).
                    precondition(!entries[slot]!.contains { after.state(ofSpan: $0).isChunkMode }, "the entries of \(slot) stay in chunk mode: \(after)")
                }
            }
        }
        // Spans opening or closing whose entry is no longer in chunk mode: to closed.
        let closable = touched.flatMap { sectionIndex in
            (0..<PoolGeometry.spansPerSection).filter { isIntermediate(span(sectionIndex, $0)) && !section(sectionIndex).state(ofSpan: $0).isChunkMode }
                .map { HeaderSlot.span(section: sectionIndex, span: $0) }
        }
        if !closable.isEmpty {
            let outcomes: [UpdateOutcome<SpanHeader>] = try await link.updateEachInDoorbells(
                closable, UpdatePolicy(attemptsMax: 1), known: closable.map { pool[$0] }, trace: &trace
            ) { _, header in
                switch header.mode {
                case .opening: header.abandoningOpening(owner: owner)
                case .closing: header.log.owner == owner ? header.closed() : nil
                case .open, .closed: nil
                }
            }
            for (slot, outcome) in zip(closable, outcomes) {
                store(outcome, at: slot)
                guard let after = outcome.committedWord else { continue }
                precondition(after.mode == .closed, "closing \(slot) left it \(after.mode)")
                report.spansClosed += 1
            }
        }
    }

    private func isIntermediate(_ header: SpanHeader) -> Bool {
        header.log.owner == owner && (header.mode == .opening || header.mode == .closing)
    }

    // MARK: Step 4: intents

    mutating func clearIntents(on link: MemoryNodeLink, report: inout RecoveryReport, trace: inout OperationTrace) async throws(FabricError) {
        for slot in 0..<pool.intents.count {
            guard let intent = IntentRecord(rawValue: pool.intents[slot]), intent.isValid, intent.owner == owner else { continue }
            let busy = intent.sections.contains { index in
                index < pool.sections.count && isPendingByOwner(section(index)) && section(index).log.sizeCode == SectionHeader.multiSectionSizeCode
            }
            guard !busy else { continue }
            let address = link.grant.intentAddress(owner: owner, slot: slot)
            let outcome: UpdateOutcome<RawWord> = try await link.update(
                .word(address, known: intent.rawValue), UpdatePolicy(attemptsMax: 1), trace: &trace
            ) { _ in RawWord(IntentRecord.none.rawValue) }
            if case .updated = outcome {
                pool.intents[slot] = IntentRecord.none.rawValue
                report.intentsCleared += 1
            }
        }
    }
}

extension MemoryNodeLink {
    /// `updateEach` in doorbells of at most `RecoveryPass.verbsPerDoorbellMax` CASes, one
    /// after the other; the outcomes in the order of `slots`.
    func updateEachInDoorbells<Header: LoggedHeader>(
        _ slots: [HeaderSlot], _ policy: UpdatePolicy, known: [UInt64], trace: inout OperationTrace, _ transition: (HeaderSlot, Header) -> Header?
    ) async throws(FabricError) -> [UpdateOutcome<Header>] {
        var outcomes: [UpdateOutcome<Header>] = []
        let step = RecoveryPass.verbsPerDoorbellMax
        for start in stride(from: 0, to: slots.count, by: step) {
            let end = min(start + step, slots.count)
            outcomes += try await updateEach(Array(slots[start..<end]), policy, known: Array(known[start..<end]), trace: &trace, transition)
        }
        return outcomes
    }
}

/// The write-ahead log of one compute node on one memory node.
///
/// Rules (DESIGN.md section 5, "Flush"):
/// - A block operation commits its temporary log in the same CAS that changes the bitmap,
///   and sets the header's pending bit; no other block operation can commit on that
///   header until the bit is clear.
/// - The committing node (and, for a dead node, recovery after fencing it) writes the
///   block's full-log record at the block's first chunk and clears the bit, the WRITE
///   before the CAS in one doorbell: `flush`, or folded into the node's next commit on
///   the same header (`LogHandling.commitAfterFlush`).
/// - A multi-section operation announces itself in an intent record first and logs on
///   every section header; its record is written once, before the bits are cleared
///   (`flushRun`), and the intent is cleared last.
extension MemoryNodeLink {
    /// The full-log record of an operation this node commits.
    func record(allocated: Bool, block: Block, application: ApplicationID, sequence: LogSequence) -> FullLogRecord {
        FullLogRecord(
            allocated: allocated, owner: owner, application: application, chunkCountLog2: block.chunkCountLog2,
            layer: block.layer, sequence: sequence, incarnation: incarnation)
    }

    /// The WRITE that puts a pending log's record in the full log.
    func flushWrite(_ log: PendingLog) -> Verb { .writeWord(log.recordAddress, log.record.rawValue, rkey: metadataKey) }

    /// The WRITE of this node's intent slot `slot` (`IntentRecord.none` clears it).
    func intentWrite(_ intent: IntentRecord, slot: Int) -> Verb {
        .writeWord(grant.intentAddress(owner: owner, slot: slot), intent.rawValue, rkey: metadataKey)
    }

    /// Records the log of a commit this node just made on `slot` (to be flushed by whoever
    /// takes the job), after checking the commit's postcondition: the header's log is
    /// pending and names this node.
    func logCommitted<Header: LoggedHeader>(_ header: Header, on slot: HeaderSlot, block: Block, allocated: Bool, application: ApplicationID, taken: Bool) {
        precondition(header.logPending && header.log.owner == owner, "a commit on \(slot) left \(header) without this node's pending log")
        let record = record(allocated: allocated, block: block, application: application, sequence: header.log.sequence)
        pending.withLock { table in
            table.add(slot, recordAddress: grant.recordAddress(chunk: block.firstChunk), record: record, sequence: header.log.sequence, taken: taken)
            debugOnly { table.checkInvariants(owner: owner) }
        }
    }

    /// Flushes this node's pending log on `slot` unless another task holds the job: writes
    /// the record and, in the same doorbell, replaces the header by `transform` of its
    /// flushed self (by default just the cleared bit). A lost CAS is retried from the word
    /// it returns (span states may change while a log is pending); a cached word that
    /// does not show the log is read once. Answers the header written, or nil (no job, or
    /// the log is not there: recovery owns it).
    func flush<Header: LoggedHeader>(
        _ type: Header.Type, _ slot: HeaderSlot, attemptsMax: Int, trace: inout OperationTrace,
        then transform: (Header) -> Header = { $0 }
    ) async -> Header? {
        guard let log = pending.withLock({ $0.take(slot) }) else { return nil }
        defer { pending.withLock { $0.remove(slot, sequence: log.sequence) } }
        let outcome: UpdateOutcome<Header>? = try? await update(
            .header(slot), UpdatePolicy(attemptsMax: attemptsMax, rereadOnRefusal: true), before: [flushWrite(log)], trace: &trace
        ) { header in
            guard header.isPending(by: owner, sequence: log.sequence), let flushed = header.flushed() else { return nil }
            return transform(flushed)
        }
        guard case .updated(let header)? = outcome else { return nil }
        precondition(!header.logPending, "a flush of \(slot) left its log pending")
        return header
    }

    /// Registers the logs of a multi-section operation this node just committed: one per
    /// section header, all for the same record, which carries the first section's log
    /// sequence (taken: `flushRun` flushes them).
    func logCommittedRun(_ headers: [(HeaderSlot, SectionHeader)], block: Block, allocated: Bool, application: ApplicationID) -> FullLogRecord {
        let sequence = headers[0].1.log.sequence
        let record = record(allocated: allocated, block: block, application: application, sequence: sequence)
        pending.withLock { table in
            for (slot, header) in headers {
                precondition(header.logPending && header.log.owner == owner, "a multi-section commit left \(slot) without this node's log")
                table.add(slot, recordAddress: grant.recordAddress(chunk: block.firstChunk), record: record, sequence: header.log.sequence, taken: true)
            }
        }
        return record
    }

    /// Flushes a multi-section operation: one doorbell writes its record and clears each
    /// section's pending bit (a clear that loses to a span-state change is retried from
    /// the answer); then the intent slot is cleared. Nothing is written for a section whose
    /// log is no longer this node's (recovery owns it).
    func flushRun(_ headers: [(HeaderSlot, SectionHeader)], record: FullLogRecord, at block: Block, intentSlot: Int, attemptsMax: Int, trace: inout OperationTrace) async {
        let sequences = Dictionary(uniqueKeysWithValues: headers.map { ($0.0, $0.1.log.sequence) })
        _ = try? await updateEach(
            headers.map(\.0), UpdatePolicy(attemptsMax: attemptsMax),
            before: [.writeWord(grant.recordAddress(chunk: block.firstChunk), record.rawValue, rkey: metadataKey)], trace: &trace
        ) { (slot, header: SectionHeader) in
            header.isPending(by: owner, sequence: sequences[slot]!) ? header.flushed() : nil
        }
        _ = try? await post([intentWrite(.none, slot: intentSlot)], trace: &trace)
        pending.withLock { table in for (slot, header) in headers { table.remove(slot, sequence: header.log.sequence) } }
    }
}

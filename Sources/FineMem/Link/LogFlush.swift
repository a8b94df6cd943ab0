/// The write-ahead log's verbs: a compute node's commits recorded as pending logs, and
/// their flushes, on one memory node (the rules L1-L6 they keep are stated with the
/// pending logs, in Log/PendingLogs.swift).
extension MemoryNodeLink {
    /// The full-log record of an operation this node commits.
    func record(allocated: Bool, block: Block, application: ApplicationID, sequence: LogSequence) -> FullLogRecord {
        FullLogRecord(
            allocated: allocated, owner: owner, application: application, chunkCountLog2: block.chunkCountLog2,
            layer: block.layer, sequence: sequence, incarnation: incarnation)
    }

    /// The WRITE of this node's intent slot `slot` (`IntentRecord.none` clears it): the
    /// one metadata word that changes by WRITE, not through the update primitive. No CAS
    /// is needed, because no one else writes the slot while this node lives: the slot is
    /// this node's, and recovery (the only other writer, by CAS) runs after the node is
    /// fenced, when its verbs no longer execute. And no ordering is lost: an intent is set
    /// in the doorbell of its claim, before the CASes (an atomic never passes an earlier
    /// WRITE on its queue pair), and cleared in a doorbell of its own, posted after the
    /// answers of the flush it follows came back (so it cannot pass them).
    func intentWrite(_ intent: IntentRecord, slot: Int) -> Verb {
        .writeWord(grant.intentAddress(owner: owner, slot: slot), intent.rawValue, rkey: metadataKey)
    }

    /// Records the log of a block operation this node just committed on `slot` (to be
    /// flushed by whoever takes the job), after checking the commit's postcondition: the
    /// header's log is pending and names this node. `also` runs in the same critical
    /// section of the cache (the operation's last touch of it: its busy mark's release).
    /// Answers the log's serial when the caller must queue the header's upkeep (none is
    /// queued yet).
    func logCommitted<Header: LoggedHeader>(
        _ header: Header, on slot: HeaderSlot, block: Block, allocated: Bool, application: ApplicationID, recordBefore: UInt64,
        also: (inout HeaderCache) -> Void = { _ in }
    ) -> UInt64? {
        precondition(header.logPending && header.log.owner == owner, "a commit on \(slot) left \(header) without this node's pending log")
        let record = record(allocated: allocated, block: block, application: application, sequence: header.log.sequence)
        return cache.withShard(of: slot) { cache in
            cache.pending.add(slot, recordAddress: grant.recordAddress(chunk: block.firstChunk), record: record, recordBefore: recordBefore,
                              sequence: header.log.sequence, taken: false)
            also(&cache)
            return cache.pending.queueUpkeep(slot)
        }
    }

    /// Flushes this node's pending log on `slot` unless another task holds the job: the
    /// record CAS and, in the same doorbell, the header replaced by `transform` of its
    /// flushed self (by default just the cleared bit). A lost header CAS is retried from
    /// the word it returns (span states may change while a log is pending), with backoff
    /// between rounds of `attemptsMax`: a live node never abandons a flush (its bound is
    /// the node's life: once fenced, its verbs fail). A cached word that does not show the
    /// log is read once. Answers the header written, or nil (no job, the connection failed,
    /// or the log is not there: recovery owns it). A flush whose connection failed keeps
    /// the log in the table (the link is broken: the log is the node's until recovery
    /// settles it, never dropped).
    func flush<Header: LoggedHeader>(
        _ type: Header.Type, _ slot: HeaderSlot, attemptsMax: Int, backoffNanos: ClosedRange<UInt64>, runtime: any Runtime,
        trace: inout OperationTrace, then transform: (Header) -> Header = { $0 }
    ) async -> Header? {
        guard let log = cache.withShard(of: slot, { $0.pending.take(slot) }) else { return nil }
        var failed = false
        var gaveUp = false
        defer {
            cache.withShard(of: slot) { cache in
                if failed || gaveUp { cache.pending.release(slot, serial: log.serial) } else { cache.pending.remove(slot, serial: log.serial) }
            }
            if gaveUp { logReturned(slot, trace: &trace) }
        }
        var handling = LogHandling.flush(log)
        var pause = Pause(backoffNanos)
        for _ in 0..<Self.flushRoundsMax {
            let outcome: UpdateOutcome<Header>
            do {
                outcome = try await update(
                    .header(slot), UpdatePolicy(attemptsMax: attemptsMax, log: handling, rereadOnRefusal: true), trace: &trace
                ) { header in
                    guard header.isPending(by: owner, sequence: log.sequence), let flushed = header.flushed() else { return nil }
                    return transform(flushed)
                }
            } catch {
                failed = true
                return nil
            }
            switch outcome {
            case .updated(let header), .committed(let header, _):
                precondition(!header.logPending, "a flush of \(slot) left its log pending")
                return header
            case .refused:
                return nil
            case .lost:
                // The record is in place; only the header's bit remains to be cleared.
                handling = .keep
                trace.flushRounds += 1
                await pause.sleep(on: runtime)
            }
        }
        // Contention outlasted the bound: the log goes back to the table (never dropped),
        // and the owner queues its flush again.
        gaveUp = true
        return nil
    }

    /// Rounds of `attemptsMax` header CASes, with a pause after each, that one `flush`
    /// spends before it gives its log back to be flushed again: a bound on one call, not
    /// on the flush, which a live node never abandons.
    static let flushRoundsMax = 1_024

    /// Registers the logs of a multi-section operation this node just committed: one per
    /// section header, all for the same record, which carries the first section's log
    /// sequence (taken: `flushRun` flushes them). Answers the log and the entries' serials,
    /// in the order of `headers`.
    func logCommittedRun(
        _ headers: [(HeaderSlot, SectionHeader)], block: Block, allocated: Bool, application: ApplicationID, recordBefore: UInt64
    ) -> (log: PendingLog, serials: [UInt64]) {
        let sequence = headers[0].1.log.sequence
        let record = record(allocated: allocated, block: block, application: application, sequence: sequence)
        let recordAddress = grant.recordAddress(chunk: block.firstChunk)
        let entries = headers.map { slot, header in
            precondition(header.logPending && header.log.owner == owner, "a multi-section commit left \(slot) without this node's log")
            return cache.withShard(of: slot) {
                $0.pending.add(slot, recordAddress: recordAddress, record: record, recordBefore: recordBefore, sequence: header.log.sequence, taken: true)
            }
        }
        return (entries[0], entries.map(\.serial))
    }

    /// Flushes a multi-section operation: one doorbell updates its record and clears each
    /// section's pending bit (a clear that loses to a span-state change is retried from the
    /// answer, with backoff between rounds, until done); then the intent slot is cleared.
    /// Nothing is cleared for a section whose log is no longer this node's (recovery owns it).
    func flushRun(
        _ headers: [(HeaderSlot, SectionHeader)], log: PendingLog, serials: [UInt64], intentSlot: Int, attemptsMax: Int,
        backoffNanos: ClosedRange<UInt64>, runtime: any Runtime, trace: inout OperationTrace
    ) async {
        let sequences = Dictionary(uniqueKeysWithValues: headers.map { ($0.0, $0.1.log.sequence) })
        var remaining = headers.map(\.0)
        var handling = LogHandling.flush(log)
        var pause = Pause(backoffNanos)
        // No round bound: the intent must stay until every bit is cleared (rule L5), and
        // the bits are this node's to clear. The bound is the node's lease: once it is
        // fenced, its verbs fail and the logs and the intent are left to recovery.
        while !remaining.isEmpty {
            let outcomes: [UpdateOutcome<SectionHeader>]
            do {
                // A cached word that does not show the log is read afresh before the section
                // is taken for done: skipping a clear on a stale cache would leave the
                // section pending for good, and clear the intent under it.
                outcomes = try await updateEach(
                    remaining, UpdatePolicy(attemptsMax: attemptsMax, log: handling, rereadOnRefusal: true), trace: &trace
                ) { [owner] slot, header in
                    header.isPending(by: owner, sequence: sequences[slot]!) ? header.flushed() : nil
                }
            } catch {
                // The link is broken: the logs stay the node's (in the table) and the intent
                // stays, for recovery.
                for ((slot, _), serial) in zip(headers, serials) { cache.withShard(of: slot) { $0.pending.release(slot, serial: serial) } }
                return
            }
            remaining = zip(remaining, outcomes).compactMap { slot, outcome in
                if case .lost = outcome { slot } else { nil }
            }
            guard !remaining.isEmpty else { break }
            handling = .keep
            trace.flushRounds += 1
            await pause.sleep(on: runtime)
        }
        _ = try? await post([intentWrite(.none, slot: intentSlot)], trace: &trace)
        for ((slot, _), serial) in zip(headers, serials) { cache.withShard(of: slot) { $0.pending.remove(slot, serial: serial) } }
    }
}

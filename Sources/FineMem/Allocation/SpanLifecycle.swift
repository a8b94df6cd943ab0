/// How a span enters and leaves chunk mode (invariant L6 of the write-ahead log).
///
/// Open, three doorbells: mark the closed span header `opening`, naming this node (the
/// mark is the exclusive right to open it: nobody else flips the entry of a span marked
/// by another); flip the span's section entry from empty to chunk mode; open the span
/// header with the first claim. A failed flip (the entry went whole, or a pending log
/// covers the span) gives the mark up. Close: the flush of the free that emptied an open
/// span marks it `closing` in the same CAS; the node then returns the section entry to
/// empty, and last marks the span `closed`.
///
/// Between any two verbs the state names the node in the middle: an `opening` or
/// `closing` span carries it in its log's owner field. A chunk-mode entry over a `closed`
/// span never arises (the flip happens only under the mark, the close returns the entry
/// before it clears the mark).
extension BlockAllocator {
    /// Opens an empty span for a first claim of `2^chunkCountLog2` chunks at its start;
    /// nil when the span could not be opened (someone else got there first).
    func openSpan(
        section: Int, span: Int, chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let spanSlot = HeaderSlot.span(section: section, span: span)
        let mark: UpdateOutcome<SpanHeader> = try await update(spanSlot, UpdatePolicy(attemptsMax: 1), on: link, trace: &trace) {
            $0.markingOpening(owner: owner)
        }
        guard case .updated(let marked) = mark else { return nil }
        // This node holds the right to open the span, and the span names it.
        precondition(marked.mode == .opening && marked.log.owner == owner, "marking \(spanSlot) opening left \(marked)")
        let flip: UpdateOutcome<SectionHeader> = try await update(
            .section(section), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax, rereadOnRefusal: true), on: link, trace: &trace
        ) { $0.openingSpan(span) }
        guard case .updated(let flipped) = flip else {
            try await abandonOpening(of: spanSlot, on: link, trace: &trace)
            if case .lost = flip { throw .retryLimitExceeded(attempts: configuration.spanStateAttemptsMax) }
            return nil
        }
        precondition(flipped.state(ofSpan: span).isChunkMode, "flipping span \(span) of section \(section) left \(flipped)")
        let run = HeaderRun(offset: 0, countLog2: chunkCountLog2)
        let block = SpanHeader.block(at: run, of: spanSlot, on: link.memoryNode)
        let opened: UpdateOutcome<SpanHeader> = try await update(
            spanSlot, UpdatePolicy(attemptsMax: configuration.spanOpenAttemptsMax, log: .commit(record: link.grant.recordAddress(chunk: block.firstChunk)),
                                   rereadOnRefusal: true),
            on: link, trace: &trace
        ) { $0.opening(run, owner: owner) }
        guard case .committed(let header, let recordBefore) = opened else {
            throw .corruptMetadata("\(spanSlot), marked opening by \(owner), changed under the mark: \(opened)")
        }
        precondition(header.mode == .open && header.marksAllocated(run) && header.logPending && header.log.owner == owner,
                     "opening \(spanSlot) with \(run) left \(header)")
        trace.spansOpened += 1
        committed(header, on: spanSlot, block: block, allocated: true, application: application, recordBefore: recordBefore, link: link)
        return block
    }

    /// Gives up this node's `opening` mark on a span whose section entry it could not flip.
    private func abandonOpening(of spanSlot: HeaderSlot, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) {
        let outcome: UpdateOutcome<SpanHeader> = try await update(
            spanSlot, UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax, rereadOnRefusal: true), on: link, trace: &trace
        ) { $0.abandoningOpening(owner: owner) }
        switch outcome {
        case .updated(let header):
            precondition(header.mode == .closed, "giving up the opening of \(spanSlot) left \(header)")
            return
        case .refused(let current): throw .corruptMetadata("\(spanSlot), marked opening by \(owner), changed under the mark: \(current)")
        case .lost: throw .retryLimitExceeded(attempts: configuration.spanStateAttemptsMax)
        case .committed: preconditionFailure("a state change answers updated")
        }
    }

    /// Sets a chunk-mode span's section entry back to empty after a close (the span is
    /// `closing` by this node). The entry is read afresh before concluding that there is
    /// nothing to return, which the protocol does not allow.
    func returnSpanToSection(section: Int, span: Int, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) {
        let outcome: UpdateOutcome<SectionHeader> = try await update(
            .section(section), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax, rereadOnRefusal: true), on: link, trace: &trace
        ) { $0.closingSpan(span) }
        switch outcome {
        case .updated(let header):
            precondition(!header.state(ofSpan: span).isChunkMode, "returning span \(span) left section \(section) as \(header)")
            return
        case .refused(let current):
            throw .corruptMetadata("section \(section) entry of span \(span) is not in chunk mode while this node returns it: \(current)")
        case .lost: throw .retryLimitExceeded(attempts: configuration.spanStateAttemptsMax)
        case .committed: preconditionFailure("a state change answers updated")
        }
    }

    /// The upkeep of a span header with a queued log of this node, by whichever task gets
    /// the job: flush the log; if the span turns out empty, mark it `closing` in the same
    /// CAS, return it to its section and mark it `closed`; otherwise bring the section's
    /// search hint up to date.
    func spanUpkeep(section: Int, span: Int, on link: MemoryNodeLink, trace: inout OperationTrace) async {
        let slot = HeaderSlot.span(section: section, span: span)
        guard let header = await flush(SpanHeader.self, slot, on: link, trace: &trace, then: { $0.closing() ?? $0 }) else { return }
        if header.mode == .closing {
            await finishClosing(section: section, span: span, closing: header, on: link, trace: &trace)
        } else {
            await hintSpan(section: section, span: span, header: header, on: link, trace: &trace)
        }
    }

    /// Keeps a span's section entry telling searches whether to avoid it: avoid once it is
    /// full or contended, back to normal once a quarter of it is free and it is not
    /// contended (hysteresis, so that a span at the edge does not flip on every operation).
    /// A hint: a lost race leaves it stale, never unsafe.
    private func hintSpan(section: Int, span: Int, header: SpanHeader, on link: MemoryNodeLink, trace: inout OperationTrace) async {
        let freeChunks = SpanHeader.chunkCount - header.bitmap.nonzeroBitCount
        let avoid: Bool
        if header.contended || freeChunks == 0 {
            avoid = true
        } else if freeChunks >= SpanHeader.chunkCount / 4 {
            avoid = false
        } else {
            return
        }
        let _: UpdateOutcome<SectionHeader>? = try? await update(
            .section(section), UpdatePolicy(attemptsMax: configuration.hintAttemptsMax), on: link, trace: &trace
        ) { $0.hintingSpan(span, avoid: avoid) }
    }

    /// The last two steps of returning an emptied span: its section entry back to empty,
    /// then the span header from `closing` to `closed`. A live node never abandons a
    /// close, as it never abandons a flush: until the entry is back, the span is `closing`
    /// in this node's name and nobody else may finish it (L6), so a return that lost
    /// `spanStateAttemptsMax` CASes (a hot section) goes on in rounds with backoff between
    /// them; its bound is the node's life (once fenced, its verbs fail). Nobody but this
    /// node changes a `closing` span's word, so its last CAS loses only to a stale word,
    /// read again.
    private func finishClosing(section: Int, span: Int, closing: SpanHeader, on link: MemoryNodeLink, trace: inout OperationTrace) async {
        var pause = Pause(configuration.backoffNanos)
        while true {
            do {
                try await returnSpanToSection(section: section, span: span, on: link, trace: &trace)
                break
            } catch .retryLimitExceeded {
                trace.flushRounds += 1
                await pause.sleep(on: runtime)
            } catch {
                trace.upkeepErrors += 1
                return
            }
        }
        let slot = HeaderSlot.span(section: section, span: span)
        let owner = owner
        let outcome: UpdateOutcome<SpanHeader>? = try? await link.update(
            .header(slot, known: closing.rawValue), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax, rereadOnRefusal: true), trace: &trace
        ) { $0.log.owner == owner ? $0.closed() : nil }
        takeEffects(of: &trace, on: link)
        if case .updated? = outcome { trace.spansClosed += 1 } else { trace.upkeepErrors += 1 }
    }
}

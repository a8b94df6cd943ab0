/// How a span enters and leaves chunk mode.
///
/// Open: a node flips the span's section entry from empty to chunk mode by CAS (the
/// "opening right"), then opens the span header with its first claim by CAS. Close: the
/// free that empties an open span is followed, in its flush's CAS, by marking the span
/// `closing`; the node then returns the section entry to empty, and last marks the span
/// `closed`. Between the steps the intermediate states are: chunk-mode entry over a
/// closed span (an opening in progress), and `closing` span under a chunk-mode entry (a
/// close in progress, its log naming the closing node).
extension BlockAllocator {
    /// Flips an empty span's section entry to chunk mode (reading the span header in the
    /// same doorbell), then opens the span header with the first claim. Gives the span
    /// back if it cannot be opened; nil then.
    func openSpan(
        section: Int, span: Int, chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let spanSlot = HeaderSlot.span(section: section, span: span)
        let flip: UpdateOutcome<SectionHeader> = try await update(
            .section(section), UpdatePolicy(attemptsMax: 1), on: link, alsoRead: [spanSlot], trace: &trace
        ) { $0.openingSpan(span) }
        guard case .updated = flip else { return nil }
        // This node now holds the right to open the span.
        var backoff = Backoff(configuration)
        waiting: for _ in 0..<configuration.spanOpenAttemptsMax {
            let opened: UpdateOutcome<SpanHeader> = try await update(
                spanSlot, UpdatePolicy(attemptsMax: configuration.spanOpenAttemptsMax), on: link, trace: &trace
            ) { $0.opening(HeaderRun(offset: 0, countLog2: chunkCountLog2), owner: owner) }
            switch opened {
            case .updated(let header):
                trace.spansOpened += 1
                let block = SpanHeader.block(at: HeaderRun(offset: 0, countLog2: chunkCountLog2), of: spanSlot, on: link.memoryNode)
                committed(header, on: spanSlot, block: block, allocated: true, application: application, link: link)
                return block
            case .lost:
                break waiting
            case .refused(let current):
                switch SpanHeader(rawValue: current)?.mode {
                case .closing?:
                    // Another node is finishing a close: its last step is the span header.
                    try await backoff.pause(runtime)
                    do { try await link.readHeaders([spanSlot], trace: &trace) } catch { throw .fabric(error) }
                case .open?:
                    // The section entry was empty, so the span cannot be open (invariant 2).
                    throw .corruptMetadata("\(spanSlot) is open under an empty section entry")
                case .closed?, nil:
                    break waiting
                }
            }
        }
        try await returnSpanToSection(section: section, span: span, on: link, trace: &trace)
        return nil
    }

    /// Sets a chunk-mode span's section entry back to empty (its header is closed or
    /// closing and this node holds the right to it).
    func returnSpanToSection(section: Int, span: Int, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) {
        let outcome: UpdateOutcome<SectionHeader> = try await update(
            .section(section), UpdatePolicy(attemptsMax: configuration.spanStateAttemptsMax), on: link, trace: &trace
        ) { $0.closingSpan(span) }
        if case .lost = outcome { throw .retryLimitExceeded(attempts: configuration.spanStateAttemptsMax) }
    }

    /// The upkeep of a span header with a queued log of this node, by whichever task gets
    /// the job: flush the log; if the span turns out empty, mark it `closing` in the same
    /// CAS, return it to its section and mark it `closed`; otherwise bring the section's
    /// search hint up to date.
    func spanUpkeep(section: Int, span: Int, on link: MemoryNodeLink, trace: inout OperationTrace) async {
        let slot = HeaderSlot.span(section: section, span: span)
        guard let header = await link.flush(SpanHeader.self, slot, attemptsMax: configuration.flushAttemptsMax, trace: &trace, then: { $0.closing() ?? $0 })
        else { return }
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
    /// then the span header from `closing` to `closed`.
    private func finishClosing(section: Int, span: Int, closing: SpanHeader, on link: MemoryNodeLink, trace: inout OperationTrace) async {
        guard (try? await returnSpanToSection(section: section, span: span, on: link, trace: &trace)) != nil else { return }
        let slot = HeaderSlot.span(section: section, span: span)
        let outcome: UpdateOutcome<SpanHeader>? = try? await link.update(
            .header(slot, known: closing.rawValue), UpdatePolicy(attemptsMax: 1), trace: &trace
        ) { $0.closed() }
        if case .updated? = outcome { trace.spansClosed += 1 }
    }
}

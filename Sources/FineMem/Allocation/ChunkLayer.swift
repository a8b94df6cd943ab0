/// The chunk layer: blocks of 1-16 chunks inside one span, committed by one CAS on the
/// span header. A span enters chunk mode when a node flips its section entry from empty
/// (the "opening right") and then opens the span header with its first claim; it leaves
/// chunk mode when a free empties it: span `closing`, section entry empty, span `closed`.
enum SpanChoice: Sendable {
    /// Claim `offset` in an open span whose cached word is `word`.
    case claim(section: Int, span: Int, word: UInt64, offset: Int)
    /// The span headers of this chunk-mode section are not cached yet.
    case readSpans(section: Int)
    /// Open this empty span.
    case open(section: Int, span: Int)
    /// Every candidate has a CAS of this node in flight: try again shortly.
    case wait
}

extension BlockAllocator {
    /// Picks where to put `2^sizeLog2` chunks, from the cache: a normal open span with room,
    /// else an uncached chunk-mode section (to read), else an empty span (preferring
    /// sections already in use, so that whole sections stay free for large blocks), else a
    /// contended or full-hinted span with room. Marks the chosen header busy.
    func chooseSpan(sizeLog2: Int, cache: inout HeaderCache, node: MemoryNodeState<Connection>) -> SpanChoice? {
        let sectionCount = cache.sections.count
        var openInUsedSection: (Int, Int)?
        var openInEmptySection: (Int, Int)?
        var avoided: (section: Int, span: Int, offset: Int)?
        var unknown: Int?
        var skippedBusy = false
        for step in 0..<sectionCount {
            let s = (cache.cursor + step) % sectionCount
            guard let section = HeaderCache.settled(SectionHeader.self, cache.sections[s]) else { continue }
            for p in 0..<SectionHeader.spanCount {
                let state = section.state(ofSpan: p)
                switch state {
                case .whole:
                    continue
                case .empty:
                    guard openInUsedSection == nil else { continue }
                    if cache.busy.contains(node.sectionAddress(s)) { skippedBusy = true; continue }
                    if !section.isAllEmpty { openInUsedSection = (s, p) } else if openInEmptySection == nil { openInEmptySection = (s, p) }
                case .chunks, .chunksAvoid:
                    guard cache.spansKnown[s] else {
                        if unknown == nil { unknown = s }
                        continue
                    }
                    let address = node.spanAddress(s, p)
                    guard let span = HeaderCache.settled(SpanHeader.self, cache.span(s, p)),
                          let offset = span.firstFreeRun(sizeLog2: sizeLog2)
                    else { continue }
                    if cache.busy.contains(address) { skippedBusy = true; continue }
                    if state == .chunks, !span.contended, !waitsForFlush(SpanHeader.self, cache.span(s, p), at: address, on: node) {
                        cache.cursor = s
                        cache.busy.insert(address)
                        return .claim(section: s, span: p, word: cache.span(s, p), offset: offset)
                    }
                    if avoided == nil { avoided = (s, p, offset) }
                }
            }
        }
        if let unknown { return .readSpans(section: unknown) }
        if let (s, p) = openInUsedSection ?? openInEmptySection {
            cache.busy.insert(node.sectionAddress(s))
            cache.cursor = s
            return .open(section: s, span: p)
        }
        if let avoided {
            cache.busy.insert(node.spanAddress(avoided.section, avoided.span))
            return .claim(section: avoided.section, span: avoided.span, word: cache.span(avoided.section, avoided.span), offset: avoided.offset)
        }
        return skippedBusy ? .wait : nil
    }

    /// Allocates `2^sizeLog2` chunks on `node`; nil when the node has no room.
    func allocateChunks(
        sizeLog2: Int, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        var refreshed = false
        var failures: [RemoteAddress: Int] = [:]
        var backoff = Backoff(configuration)
        while trace.attempts < configuration.maxAttempts {
            switch node.cache.withLock({ chooseSpan(sizeLog2: sizeLog2, cache: &$0, node: node) }) {
            case nil:
                if refreshed { return nil }
                refreshed = true
                try await refresh(node, trace: &trace)
            case .wait:
                try await backoff.pause(runtime)
            case .readSpans(let s):
                let words = try await post([.readWords(node.spanAddress(s, 0), count: SectionHeader.spanCount, rkey: node.metadataKey)], on: node, trace: &trace)[0].words
                node.cache.withLock { cache in
                    for (p, word) in words.enumerated() { cache.setSpan(s, p, word) }
                    cache.spansKnown[s] = true
                }
            case .claim(let s, let p, let word, let offset):
                let address = node.spanAddress(s, p)
                defer { releaseBusy(address, on: node) }
                let failed = failures[address, default: 0]
                let result = try await commit(
                    SpanHeader.self, at: address, cached: word, on: node, trace: &trace,
                    requeue: { flushIfReturned($0, exchanged: $1, node: node, span: (s, p)) }
                ) { header in
                    header.claiming(offset: offset, sizeLog2: sizeLog2, owner: owner).map { markingContention($0, failures: failed) }
                }
                switch result {
                case .committed(let header):
                    let block = Block(memoryNode: node.grant.memoryNode, firstChunk: s * PoolGeometry.chunksPerSection + p * PoolGeometry.chunksPerSpan + offset, sizeLog2: sizeLog2)
                    committedSpan(header, block: block, allocated: true, application: application, section: s, span: p, node: node)
                    return block
                case .lost(let original):
                    node.cache.withLock { $0.setSpan(s, p, original) }
                    failures[address, default: 0] += 1
                    trace.retries += 1
                    try await lost(to: original, SpanHeader.self, backoff: &backoff, trace: &trace)
                case .notApplicable:
                    trace.attempts += 1
                }
            case .open(let s, let p):
                let sectionAddress = node.sectionAddress(s)
                defer { releaseBusy(sectionAddress, on: node) }
                if let block = try await openSpan(section: s, span: p, sizeLog2: sizeLog2, application: application, on: node, trace: &trace) {
                    return block
                }
                trace.attempts += 1
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// Flips an empty span's section entry to chunk mode (reading the span header in the
    /// same doorbell), then opens the span header with the first claim. Gives the span
    /// back if it cannot be opened.
    private func openSpan(
        section s: Int, span p: Int, sizeLog2: Int, application: ApplicationID, on node: MemoryNodeState<Connection>,
        trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let sectionAddress = node.sectionAddress(s)
        let spanAddress = node.spanAddress(s, p)
        let sectionWord = node.cache.withLock { $0.sections[s] }
        guard let flipped = SectionHeader(rawValue: sectionWord)?.openingSpan(p) else { return nil }
        let first = try await post([
            .compareAndSwap(sectionAddress, expected: sectionWord, desired: flipped.rawValue, rkey: node.metadataKey),
            .readWords(spanAddress, count: 1, rkey: node.metadataKey),
        ], on: node, trace: &trace)
        let flip = first[0].compareAndSwap
        var spanWord = first[1].words[0]
        node.cache.withLock { cache in
            cache.sections[s] = flip.exchanged ? flipped.rawValue : flip.original
            cache.setSpan(s, p, spanWord)
        }
        guard flip.exchanged else {
            trace.retries += 1
            return nil
        }
        // This node now holds the right to open span p.
        var backoff = Backoff(configuration)
        for _ in 0..<64 {
            guard let span = SpanHeader(rawValue: spanWord) else { break }
            if span.mode == .closing {
                // Another node is finishing a close: its last step is the span header.
                try await backoff.pause(runtime)
                spanWord = try await post([.readWords(spanAddress, count: 1, rkey: node.metadataKey)], on: node, trace: &trace)[0].words[0]
                continue
            }
            guard span.mode != .open else {
                // The section entry was empty, so the span cannot be open (invariant 3).
                throw .corruptMetadata("span \(s).\(p) is open under an empty section entry")
            }
            guard let desired = span.opening(offset: 0, sizeLog2: sizeLog2, owner: owner) else { break }
            let answer = try await post([.compareAndSwap(spanAddress, expected: spanWord, desired: desired.rawValue, rkey: node.metadataKey)], on: node, trace: &trace)[0].compareAndSwap
            if answer.exchanged {
                statisticsStore.withLock { $0.spansOpened += 1 }
                let block = Block(memoryNode: node.grant.memoryNode, firstChunk: s * PoolGeometry.chunksPerSection + p * PoolGeometry.chunksPerSpan, sizeLog2: sizeLog2)
                committedSpan(desired, block: block, allocated: true, application: application, section: s, span: p, node: node)
                return block
            }
            trace.retries += 1
            spanWord = answer.original
            node.cache.withLock { $0.setSpan(s, p, answer.original) }
        }
        try await returnSpanToSection(section: s, span: p, on: node, trace: &trace)
        return nil
    }

    /// Sets a chunk-mode span's section entry back to empty (its header is closed or
    /// closing and this node holds the right to it).
    func returnSpanToSection(section s: Int, span p: Int, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) {
        var word = node.cache.withLock { $0.sections[s] }
        for _ in 0..<configuration.maxAttempts {
            guard let back = SectionHeader(rawValue: word)?.closingSpan(p) else { return }
            let answer = try await post([.compareAndSwap(node.sectionAddress(s), expected: word, desired: back.rawValue, rkey: node.metadataKey)], on: node, trace: &trace)[0].compareAndSwap
            node.cache.withLock { $0.sections[s] = answer.exchanged ? back.rawValue : answer.original }
            if answer.exchanged { return }
            word = answer.original
        }
        throw .retryLimitExceeded(attempts: configuration.maxAttempts)
    }

    /// Frees a chunk-layer block: one CAS on its span header.
    func freeChunks(_ block: Block, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) {
        let s = block.firstChunk / PoolGeometry.chunksPerSection
        let p = block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan
        let offset = block.firstChunk % PoolGeometry.chunksPerSpan
        let address = node.spanAddress(s, p)
        var freshlyRead = false
        var backoff = Backoff(configuration)
        try await acquireBusy(address, on: node, backoff: &backoff)
        defer { releaseBusy(address, on: node) }
        while trace.attempts < configuration.maxAttempts {
            let word = node.cache.withLock { $0.span(s, p) }
            let result = try await commit(
                SpanHeader.self, at: address, cached: word, on: node, trace: &trace,
                requeue: { flushIfReturned($0, exchanged: $1, node: node, span: (s, p)) }
            ) { $0.releasing(offset: offset, sizeLog2: block.sizeLog2, owner: owner) }
            switch result {
            case .committed(let header):
                committedSpan(header, block: block, allocated: false, application: application, section: s, span: p, node: node)
                return
            case .lost(let original):
                node.cache.withLock { $0.setSpan(s, p, original) }
                trace.retries += 1
                try await lost(to: original, SpanHeader.self, backoff: &backoff, trace: &trace)
            case .notApplicable:
                guard !freshlyRead else { throw .corruptMetadata("span header \(address) does not hold \(block): \(SpanHeader(rawValue: word).map { "\($0)" } ?? "invalid")") }
                freshlyRead = true
                trace.attempts += 1
                let fresh = try await post([.readWords(address, count: 1, rkey: node.metadataKey)], on: node, trace: &trace)[0].words[0]
                node.cache.withLock { $0.setSpan(s, p, fresh) }
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// If an operation took this node's queued log on a span header and its CAS failed, the
    /// log is queued again: flush it in the background.
    func flushIfReturned(_ prepared: PreparedHeader, exchanged: Bool, node: MemoryNodeState<Connection>, span: (Int, Int)) {
        guard settle(prepared, exchanged: exchanged, pending: node.pending) else { return }
        let (s, p) = span
        startUpkeep { [self] in
            var trace = OperationTrace()
            await spanUpkeep(section: s, span: p, on: node, trace: &trace)
            return trace
        }
    }

    /// The upkeep of a span header with a queued log of this node, by whichever task gets
    /// the job: flush the log; if the span turns out empty, mark it `closing` in the same
    /// CAS, return it to its section and mark it `closed`; otherwise bring the section's
    /// search hint up to date.
    func spanUpkeep(section s: Int, span p: Int, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async {
        let address = node.spanAddress(s, p)
        let cached = node.cache.withLock { $0.span(s, p) }
        guard let after = await flush(SpanHeader.self, header: address, cached: cached, on: node, trace: &trace, then: { $0.closing() ?? $0 }),
              let header = SpanHeader(rawValue: after)
        else { return }
        node.cache.withLock { $0.setSpan(s, p, after) }
        if header.mode == .closing {
            await finishClosing(section: s, span: p, closing: header, on: node, trace: &trace)
        } else {
            await hintSpan(section: s, span: p, header: header, on: node, trace: &trace)
        }
    }

    /// After a commit on a span header: records the pending log, updates the cache and
    /// starts the upkeep (flush; close an emptied span; section hint).
    private func committedSpan(
        _ header: SpanHeader, block: Block, allocated: Bool, application: ApplicationID, section s: Int, span p: Int,
        node: MemoryNodeState<Connection>
    ) {
        let address = node.spanAddress(s, p)
        let record = record(allocated: allocated, block: block, application: application, sequence: header.log.sequence, node: node)
        node.pending.withLock { $0.add(header: address, recordAddress: node.recordAddress(block.firstChunk), record: record, sequence: header.log.sequence, taken: false) }
        node.cache.withLock { $0.setSpan(s, p, header.rawValue) }
        startUpkeep { [self] in
            var trace = OperationTrace()
            await spanUpkeep(section: s, span: p, on: node, trace: &trace)
            return trace
        }
    }

    /// Keeps a span's section entry telling searches whether to avoid it: avoid once it is
    /// full or contended, back to normal once a quarter of it is free and it is not
    /// contended (hysteresis, so that a span at the edge does not flip on every operation).
    /// A hint: a lost race leaves it stale, never unsafe.
    private func hintSpan(section s: Int, span p: Int, header: SpanHeader, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async {
        let freeChunks = SpanHeader.chunkCount - header.bitmap.nonzeroBitCount
        let avoid: Bool
        if header.contended || freeChunks == 0 {
            avoid = true
        } else if freeChunks >= SpanHeader.chunkCount / 4 {
            avoid = false
        } else {
            return
        }
        var word = node.cache.withLock { $0.sections[s] }
        for _ in 0..<4 {
            guard let section = SectionHeader(rawValue: word), let hinted = section.hintingSpan(p, avoid: avoid) else { return }
            guard let results = try? await post([.compareAndSwap(node.sectionAddress(s), expected: word, desired: hinted.rawValue, rkey: node.metadataKey)], on: node, trace: &trace) else { return }
            let answer = results[0].compareAndSwap
            node.cache.withLock { $0.sections[s] = answer.exchanged ? hinted.rawValue : answer.original }
            if answer.exchanged { return }
            word = answer.original
        }
    }

    /// The last two steps of returning an emptied span: its section entry back to empty,
    /// then the span header from `closing` to `closed`.
    private func finishClosing(section s: Int, span p: Int, closing: SpanHeader, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async {
        guard let closed = closing.closed(), (try? await returnSpanToSection(section: s, span: p, on: node, trace: &trace)) != nil else { return }
        let address = node.spanAddress(s, p)
        guard let results = try? await post([.compareAndSwap(address, expected: closing.rawValue, desired: closed.rawValue, rkey: node.metadataKey)], on: node, trace: &trace) else { return }
        let answer = results[0].compareAndSwap
        node.cache.withLock { $0.setSpan(s, p, answer.exchanged ? closed.rawValue : answer.original) }
        if answer.exchanged { statisticsStore.withLock { $0.spansClosed += 1 } }
    }
}

/// Where a search decided to go next.
enum HeaderChoice: Sendable {
    /// Claim `run` of the header at `slot`.
    case claim(HeaderSlot, HeaderRun)
    /// The span headers of this chunk-mode section are not cached yet: read them.
    case readSpans(section: Int)
    /// Open this empty span (chunk layer).
    case open(section: Int, span: Int)
    /// Every candidate has a CAS of this node in flight: try again shortly.
    case wait
    /// The only room the cache shows is in the middle of someone else's operation (a span
    /// under a section's pending log, a span being opened or closed): wait a moment and
    /// read these headers again (the cache may also just be stale).
    case recheck([HeaderSlot])
}

/// Picks where to put `2^chunkCountLog2` chunks, from the cache: a normal open span with
/// room, else an uncached chunk-mode section (to read), else an empty span (preferring
/// sections already in use, so that whole sections stay free for large blocks), else a
/// contended or full-hinted span with room. Marks the chosen header busy. Answers `.wait`
/// when the only room is in headers busy with this node's CASes, `.recheck` when it is
/// under a section's pending log (its flush is on its way), in a span someone is opening
/// or closing, or in a chunk-mode span whose cached header is not open (the section word
/// came from a later answer than the span word), nil when there is none.
func chooseSpan(chunkCountLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
    var scan = SpanScan()
    scan.chunkSpans(chunkCountLog2: chunkCountLog2, cache: &cache)
    if let (slot, run) = scan.found {
        cache.cursor = slot.section
        cache.busy.insert(slot)
        return .claim(slot, run)
    }
    if let unknownSection = scan.unknownSection { return .readSpans(section: unknownSection) }
    scan.emptySpan(cache: &cache)
    if let (section, span) = scan.open {
        cache.busy.insert(.section(section))
        cache.cursor = section
        return .open(section: section, span: span)
    }
    if let avoided = scan.avoided {
        cache.busy.insert(avoided.slot)
        return .claim(avoided.slot, avoided.run)
    }
    if scan.skippedBusy { return .wait }
    return scan.transient.map { section, span in .recheck(span.map { [section, $0] } ?? [section]) }
}

/// What `chooseSpan` found in the cache, in the order it ranks the answers.
private struct SpanScan {
    /// A normal open span with room: the answer.
    var found: (slot: HeaderSlot, run: HeaderRun)?
    /// The first chunk-mode section whose span headers are not cached.
    var unknownSection: Int?
    /// An empty span to open.
    var open: (section: Int, span: Int)?
    /// The first span with room to avoid (contended, hinted full, or waiting for a flush).
    var avoided: (slot: HeaderSlot, run: HeaderRun)?
    /// Room was passed by because this node has a CAS in flight on it.
    var skippedBusy = false
    /// The headers to read again when the only room is in the middle of an operation (a
    /// section, and maybe one of its spans); an array only when it is the answer.
    var transient: (HeaderSlot, HeaderSlot?)?

    /// The summary's chunk-mode candidates, from the cursor: a normal span with room ends
    /// the scan; the first uncached section and the first span to avoid are kept. (Loops
    /// over an iterator, not closures: a closure capturing the inout cache copies the
    /// whole struct, retaining each of its arrays, on every method call.)
    @inline(__always)
    mutating func chunkSpans(chunkCountLog2: Int, cache: inout HeaderCache) {
        var chunkCandidates = cache.chunkCandidateSections
        while let section = chunkCandidates.next() {
            guard let sectionHeader = SectionHeader(rawValue: cache[.section(section)])?.settled else { continue }
            for span in 0..<PoolGeometry.spansPerSection {
                let state = sectionHeader.state(ofSpan: span)
                guard state == .chunks || state == .chunksAvoid else { continue }
                guard cache.spansKnown(section) else {
                    if unknownSection == nil { unknownSection = section }
                    break
                }
                if chunkSpan(.span(section: section, span: span), state: state, chunkCountLog2: chunkCountLog2, cache: &cache) { return }
            }
        }
    }

    /// One chunk-mode span of `chunkSpans`: true when it is the answer.
    @inline(__always)
    private mutating func chunkSpan(_ slot: HeaderSlot, state: SectionHeader.SpanState, chunkCountLog2: Int, cache: inout HeaderCache) -> Bool {
        guard let spanHeader = cache.settled(SpanHeader.self, slot) else { return false }
        // A chunk-mode entry over a span header not open: the span is being opened or
        // closed, or (far more often) the cache holds the section word from a later answer
        // than the span word (a span another node opened after this node read it). Its
        // room is real or about to be: read the span again, never "no room".
        guard spanHeader.mode == .open else {
            if transient == nil { transient = (.section(slot.section), slot) }
            return false
        }
        guard let run = spanHeader.firstFreeRun(countLog2: chunkCountLog2) else { return false }
        if cache.busy.contains(slot) {
            skippedBusy = true
            return false
        }
        if state == .chunks, !spanHeader.contended, !cache.waitsForFlush(SpanHeader.self, slot) {
            found = (slot, run)
            return true
        }
        if avoided == nil { avoided = (slot, run) }
        return false
    }

    /// An empty span to open: in a section already in use, else in a wholly empty one.
    @inline(__always)
    mutating func emptySpan(cache: inout HeaderCache) {
        for pass in 0..<2 {
            var candidates = cache.sectionCandidateSections(used: pass == 0)
            while let section = candidates.next() {
                guard let rawSection = SectionHeader(rawValue: cache[.section(section)]) else { continue }
                let sectionHeader = rawSection.settled
                for span in 0..<PoolGeometry.spansPerSection where sectionHeader.state(ofSpan: span) == .empty {
                    // A span under the section's pending log waits for its record (L2); one
                    // still being closed or opened by someone waits for them.
                    if rawSection.pendingLogCovers(span: span) {
                        if transient == nil { transient = (.section(section), nil) }
                        continue
                    }
                    if cache.spansKnown(section), SpanHeader(rawValue: cache[.span(section: section, span: span)])?.canBeOpened != true {
                        if transient == nil { transient = (.section(section), .span(section: section, span: span)) }
                        continue
                    }
                    if cache.busy.contains(.section(section)) {
                        skippedBusy = true
                        break
                    }
                    open = (section, span)
                    return
                }
            }
        }
    }
}

/// Picks a section with an aligned run of `2^spanCountLog2` empty spans: a normal section
/// already in use first, then a wholly empty one, then a contended one (or one whose log
/// another node has yet to flush). Marks the chosen header busy; the cursor moves to the
/// section once a claim on it commits (`SectionHeader.claimCommitted`).
func chooseSection(spanCountLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
    var empty: HeaderChoice?
    var contended: HeaderChoice?
    var skippedBusy = false
    var found: HeaderChoice?
    // Only the summary's candidates: every other section has no empty span in the cache.
    var sectionCandidates = cache.sectionCandidateSections()
    while let section = sectionCandidates.next() {
        let slot = HeaderSlot.section(section)
        guard let header = cache.settled(SectionHeader.self, slot), let run = header.firstFreeRun(countLog2: spanCountLog2) else { continue }
        if cache.busy.contains(slot) { skippedBusy = true; continue }
        let choice = HeaderChoice.claim(slot, run)
        if header.contended || cache.waitsForFlush(SectionHeader.self, slot) {
            if contended == nil { contended = choice }
        } else if header.isAllEmpty {
            if empty == nil { empty = choice }
        } else {
            found = choice
            break
        }
    }
    if let found {
        if case .claim(let slot, _) = found { cache.busy.insert(slot) }
        return found
    }
    guard let chosen = empty ?? contended else { return skippedBusy ? .wait : nil }
    if case .claim(let slot, _) = chosen { cache.busy.insert(slot) }
    return chosen
}

/// Free runs among which `chooseRun` spreads its choice.
let runChoicesMax = 8

/// Where the search for a run of whole sections decided to go next.
enum RunChoice: Sendable {
    /// Claim these sections (marked busy).
    case claim(Range<Int>)
    /// Every free run has a section with a CAS of this node in flight: try again shortly.
    case wait
    /// The only runs that may be free are held by multi-section claims still pending,
    /// which may yet roll back: wait a moment and read these sections again.
    case recheck([HeaderSlot])
}

/// Picks an aligned run of `count` wholly empty sections, searching from the end of the
/// pool (small blocks fill from each node's cursor, large ones from the top), and marks
/// them busy; nil when there is none, even counting pending claims as rolled back. The
/// section words are `sectionWords` when given (a fresh read), else the cache's. The run
/// is the `spread`-th free one from the top (modulo `runChoicesMax`), or the last found
/// when there are fewer: every node searches from the top, and contenders that all took
/// the first free run would all but one lose a CAS and roll their claims back.
func chooseRun(count: Int, spread: UInt64 = 0, sectionWords: [UInt64]? = nil, cache: inout HeaderCacheShards.EveryShard) -> RunChoice? {
    let groupCount = cache.sectionCount / count
    let wanted = Int(spread % UInt64(runChoicesMax))
    var found: Range<Int>?
    var freeRuns = 0
    var skippedBusy = false
    var pendingRun: [HeaderSlot]?
    for group in stride(from: groupCount - 1, through: 0, by: -1) {
        let sections = group * count..<(group + 1) * count
        // Whether every section is empty, and if not, whether the run is held only by
        // claims still pending (it may be free once they roll back). No array per group:
        // the search looks at every group of the pool.
        var allEmpty = true
        var mayFree = true
        for section in sections {
            guard let header = SectionHeader(rawValue: sectionWords?[section] ?? cache[.section(section)]) else {
                (allEmpty, mayFree) = (false, false)
                break
            }
            guard !header.settled.isAllEmpty else { continue }
            allEmpty = false
            guard header.logPending && header.log.sizeCode == SectionHeader.multiSectionSizeCode && header.isAllWhole else {
                mayFree = false
                break
            }
        }
        guard allEmpty else {
            if mayFree, pendingRun == nil { pendingRun = sections.map(HeaderSlot.section) }
            continue
        }
        if sections.contains(where: { cache.isBusy(.section($0)) }) {
            skippedBusy = true
            continue
        }
        found = sections
        freeRuns += 1
        if freeRuns > wanted { break }
    }
    if let found {
        for section in found { cache.markBusy(.section(section)) }
        return .claim(found)
    }
    if skippedBusy { return .wait }
    return pendingRun.map { .recheck($0) }
}

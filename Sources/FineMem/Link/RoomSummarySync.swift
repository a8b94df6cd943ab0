/// Keeping and reading the room summary (`RoomSummary`) of one memory node.
///
/// Sync. A node whose CAS changed a section's room syncs the section's bit after the
/// answer (its upkeep waits `roomSummaryDelayNanos` first, and syncs of one word that
/// this node queues meanwhile are done as one), then the top bit of its word: it reads the children (section headers, or
/// words) and the words holding their bits, CASes each word that disagrees, and reads
/// both again in the same doorbell, after the CASes, until they agree. An RDMA READ does
/// not pass an earlier atomic of its RC queue pair (only WRITEs may, unless fenced; the
/// simulated NIC models the same), so the READs see the CASes' effect. They carry no
/// fence: a fenced READ after CASes broke rxe's queue pair now and then (the demo on
/// Soft-RoCE failed 2 runs in 7 with it, none in 8 without). So a sync that ends in agreement ends on a read made after its own last
/// CAS. Whoever else changes a header or a bit in the meantime is covered:
/// - a header changed after that read has a sync of its own, by its committer, which
///   starts after its CAS;
/// - a stale CAS of another node's sync (decided on a header read before the change)
///   is followed by that node's own fenced re-read, which sees the header and repairs
///   the bit.
/// A live node gives a sync up only after `roomSummarySyncRoundsMax` rounds (it pauses
/// with backoff between rounds of `attemptsMax` CASes, as a flush does), so with no node
/// dead and no sync given up (`OperationTrace.summarySyncsAbandoned`), the summary agrees
/// with the headers at rest (`PoolInspector.checkRoomSummary`). Recovery syncs the sections
/// its own CASes changed before it declares the dead node recovered. A node that dies
/// between a CAS and its sync leaves a bit stale; the summary is a hint, so that costs a
/// full refresh (which mends it), never an allocation.
extension MemoryNodeLink {
    /// Rounds of CASes a room summary sync spends between pauses (the allocator's upkeep
    /// and recovery both sync with it).
    static let roomSummarySyncAttemptsMax = 8

    /// Rounds (CASes, then READs) one level of a sync spends before it gives up: a bound
    /// that contention from live nodes does not reach (some 128 pauses of up to the
    /// longest backoff). A sync given up leaves a bit stale, as a dead node's does: the
    /// summary is a hint, and the next full refresh finds it stale and syncs it again.
    static let roomSummarySyncRoundsMax = 1_024

    /// Syncs the room summary bits of `sections` (contiguous), then the top bits of
    /// their words.
    func syncRoomSummary(
        sections: Range<Int>, attemptsMax: Int, backoffNanos: ClosedRange<UInt64>, runtime: any Runtime, trace: inout OperationTrace
    ) async throws(FabricError) {
        let sectionCount = geometry.sectionCount
        let sections = sections.clamped(to: 0..<sectionCount)
        guard !sections.isEmpty else { return }
        trace.summarySyncs += 1
        let words = RoomSummary.word(of: sections.lowerBound)..<RoomSummary.word(of: sections.upperBound - 1) + 1
        try await syncLevel(
            children: sections, childAddress: grant.address(of: .section(sections.lowerBound)), parents: words, top: false,
            attemptsMax: attemptsMax, backoffNanos: backoffNanos, runtime: runtime, trace: &trace
        ) { _, header in !(SectionHeader(rawValue: header)?.hasRoom ?? true) }
        let tops = RoomSummary.word(of: words.lowerBound)..<RoomSummary.word(of: words.upperBound - 1) + 1
        try await syncLevel(
            children: words, childAddress: grant.roomSummaryAddress(word: words.lowerBound), parents: tops, top: true,
            attemptsMax: attemptsMax, backoffNanos: backoffNanos, runtime: runtime, trace: &trace
        ) { word, value in RoomSummary.allFull(value, word: word, sections: sectionCount) }
    }

    /// One level of a sync: `children` are read from `childAddress` on; their bits live in
    /// the summary words `parents` (the top words with `top`). See the type's notes.
    private func syncLevel(
        children: Range<Int>, childAddress: RemoteAddress, parents: Range<Int>, top: Bool,
        attemptsMax: Int, backoffNanos: ClosedRange<UInt64>, runtime: any Runtime, trace: inout OperationTrace,
        isFull: (Int, UInt64) -> Bool
    ) async throws(FabricError) {
        let parentAddress = { (word: Int) -> RemoteAddress in
            top ? self.grant.roomSummaryTopAddress(word: word) : self.grant.roomSummaryAddress(word: word)
        }
        let reads: [Verb] = [
            .readWords(childAddress, count: children.count, rkey: metadataKey),
            .readWords(parentAddress(parents.lowerBound), count: parents.count, rkey: metadataKey),
        ]
        var results = try await post(reads, trace: &trace)
        var pause = Pause(backoffNanos)
        for round in 1...Self.roomSummarySyncRoundsMax {
            let childWords = results[0].words
            let parentWords = results[1].words
            let words = parents.map { (address: parentAddress($0), known: parentWords[$0 - parents.lowerBound]) }
            var answered = false
            // Each word that disagrees with its children, by one CAS; the READs ride after
            // the CASes (`answered` is not called when every word agrees: nothing is sent).
            _ = try await updateEach(words: words, UpdatePolicy(attemptsMax: 1), after: reads, trace: &trace, answered: {
                results = $0
                answered = true
            }) { offset, current in
                let desired = RoomSummary.updating(current, word: parents.lowerBound + offset, children: children, childWords: childWords, isFull: isFull)
                return desired == current ? nil : desired
            }
            guard answered else { return }
            if round % attemptsMax == 0 { await pause.sleep(on: runtime) }
        }
        trace.summarySyncsAbandoned += 1
    }

    /// Looks for room this node's cache does not know of through the room summary: reads
    /// the top words; then up to `wordsMax` words, from the cursor's on, whose top bit
    /// says some section has room; then the section and span headers of up to
    /// `sectionsMax` of those sections where the cache sees no room, into the cache. Three
    /// doorbells of a few KiB, whatever the pool size. Answers how many sections it read:
    /// none when the summary shows no room the cache does not know of already.
    func refreshFromSummary(wordsMax: Int, sectionsMax: Int, trace: inout OperationTrace) async throws(FabricError) -> Int {
        let sectionCount = geometry.sectionCount
        let wordCount = RoomSummary.wordCount(sections: sectionCount)
        let topCount = RoomSummary.topWordCount(sections: sectionCount)
        trace.summaryRefreshes += 1
        let tops = try await post([.readWords(grant.roomSummaryTopAddress(word: 0), count: topCount, rkey: metadataKey)], trace: &trace)[0].words
        trace.refreshBytes += UInt64(8 * topCount)
        let start = RoomSummary.word(of: cache.withShard(0) { $0.cursor })
        let fanOut = RoomSummary.fanOut
        var words: [Int] = []
        var word = start
        var scanned = 0
        while words.count < wordsMax, scanned < wordCount {
            let top = RoomSummary.word(of: word)
            let valid = RoomSummary.validBits(word: top, children: wordCount)
            let step: Int
            if word % fanOut == 0, tops[top] & valid == valid {
                step = min(fanOut, wordCount - word)  // a top word of full words, skipped whole
            } else {
                if tops[top] & RoomSummary.bit(of: word) == 0 { words.append(word) }
                step = 1
            }
            scanned += step
            word = (word + step) % wordCount
        }
        guard !words.isEmpty else { return 0 }
        let answers = try await post(words.map { .readWords(grant.roomSummaryAddress(word: $0), count: 1, rkey: metadataKey) }, trace: &trace)
        trace.refreshBytes += UInt64(8 * words.count)
        var sections: [Int] = []
        for (word, answer) in zip(words, answers) {
            var room = ~answer.words[0] & RoomSummary.validBits(word: word, children: sectionCount)
            while room != 0, sections.count < sectionsMax {
                let section = word * RoomSummary.fanOut + room.trailingZeroBitCount
                room &= room - 1
                if cache.withShard(of: .section(section), { !$0.isChunkCandidate(section) && !$0.isSectionCandidate(section) }) {
                    sections.append(section)
                }
            }
        }
        guard !sections.isEmpty else { return 0 }
        let verbs = sections.flatMap { section -> [Verb] in
            [read(.section(section)),
             .readWords(grant.address(of: .span(section: section, span: 0)), count: PoolGeometry.spansPerSection, rkey: metadataKey)]
        }
        let (results, ticket) = try await postTicketed(verbs, trace: &trace)
        trace.refreshBytes += UInt64(8 * (1 + PoolGeometry.spansPerSection) * sections.count)
        for (index, section) in sections.enumerated() {
            cache.withShard(of: .section(section)) { cache in
                cache.store(results[2 * index].words[0], at: .section(section), ticket: ticket)
                cache.storeSpans(of: section, results[2 * index + 1].words, ticket: ticket)
            }
        }
        return sections.count
    }
}

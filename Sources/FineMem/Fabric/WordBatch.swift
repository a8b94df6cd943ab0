/// A batch of up to `capacity` 8-byte verbs (one-word READs, compare-and-swaps,
/// fetch-and-adds) with their answers, stored inline: what the allocation fast path posts,
/// without an array per batch, per verb or per answer. It is the same batch as
/// `FabricConnection.post(_:)` of the verbs `verb(at:)` gives, with the same ordering
/// rules (no WRITE, so nothing passes anything).
///
/// ```swift
/// var batch = WordBatch()
/// let cas = batch.compareAndSwap(header, expected: old, desired: new, rkey: key)
/// let record = batch.read(recordAddress, rkey: key)
/// try await connection.post(&batch)
/// let (exchanged, original) = batch.compareAndSwapAnswer(cas)
/// ```
package struct WordBatch: Sendable {
    package static let capacity = 4

    package enum Kind: UInt8, Sendable {
        case read, compareAndSwap, fetchAndAdd

        package var verbKind: VerbKind {
            switch self {
            case .read: .read
            case .compareAndSwap: .compareAndSwap
            case .fetchAndAdd: .fetchAndAdd
            }
        }
    }

    /// One verb: `operand` is the expected value of a CAS or the delta of a fetch-and-add.
    package struct Entry: Sendable {
        package var kind: Kind
        package var address: RemoteAddress
        package var rkey: RKey
        package var operand: UInt64
        package var desired: UInt64

        static let unused = Entry(kind: .read, address: RemoteAddress(0), rkey: RKey(index: 0, tag: 0), operand: 0, desired: 0)
    }

    private var entries = InlineArray<4, Entry>(repeating: .unused)
    /// The word each verb answered: the READ's word, or the original value of an atomic.
    private var answers = InlineArray<4, UInt64>(repeating: 0)
    package private(set) var count = 0

    package init() {}

    package subscript(index: Int) -> Entry {
        precondition(index >= 0 && index < count, "verb \(index) of a batch of \(count)")
        return entries[index]
    }

    private mutating func append(_ entry: Entry) -> Int {
        precondition(count < Self.capacity, "a word batch holds \(Self.capacity) verbs")
        entries[count] = entry
        count += 1
        return count - 1
    }

    /// Appends a READ of the word at `address`; answers its index.
    @discardableResult
    package mutating func read(_ address: RemoteAddress, rkey: RKey) -> Int {
        append(Entry(kind: .read, address: address, rkey: rkey, operand: 0, desired: 0))
    }

    /// Appends a compare-and-swap; answers its index.
    @discardableResult
    package mutating func compareAndSwap(_ address: RemoteAddress, expected: UInt64, desired: UInt64, rkey: RKey) -> Int {
        append(Entry(kind: .compareAndSwap, address: address, rkey: rkey, operand: expected, desired: desired))
    }

    /// Appends a fetch-and-add; answers its index.
    @discardableResult
    package mutating func fetchAndAdd(_ address: RemoteAddress, delta: UInt64, rkey: RKey) -> Int {
        append(Entry(kind: .fetchAndAdd, address: address, rkey: rkey, operand: delta, desired: 0))
    }

    /// Sets the answer of verb `index` (by the connection that executed it).
    package mutating func answer(_ index: Int, _ word: UInt64) {
        precondition(index >= 0 && index < count, "verb \(index) of a batch of \(count)")
        answers[index] = word
    }

    /// The word a READ answered, or the original value an atomic found.
    package func word(_ index: Int) -> UInt64 {
        precondition(index >= 0 && index < count, "verb \(index) of a batch of \(count)")
        return answers[index]
    }

    /// The answer of the compare-and-swap at `index`, as `VerbResult.compareAndSwap`.
    package func compareAndSwapAnswer(_ index: Int) -> (exchanged: Bool, original: UInt64) {
        let entry = self[index]
        precondition(entry.kind == .compareAndSwap, "verb \(index) is not a CAS")
        return (answers[index] == entry.operand, answers[index])
    }

    /// Verb `index` as a general `Verb`.
    package func verb(at index: Int) -> Verb {
        let entry = self[index]
        return switch entry.kind {
        case .read: .readWords(entry.address, count: 1, rkey: entry.rkey)
        case .compareAndSwap: .compareAndSwap(entry.address, expected: entry.operand, desired: entry.desired, rkey: entry.rkey)
        case .fetchAndAdd: .fetchAndAdd(entry.address, delta: entry.operand, rkey: entry.rkey)
        }
    }

    /// The batch's verbs as general verbs, in order.
    package var verbs: [Verb] { (0..<count).map(verb(at:)) }

    /// Stores the answers of the same verbs posted as general verbs.
    package mutating func store(_ results: [VerbResult]) {
        precondition(results.count == count, "\(results.count) answers for \(count) verbs")
        for (index, result) in results.enumerated() {
            answers[index] = switch result {
            case .read: result.words[0]
            case .compareAndSwap(_, let original), .fetchAndAdd(let original): original
            case .written: preconditionFailure("a word batch has no WRITE")
            }
        }
    }
}

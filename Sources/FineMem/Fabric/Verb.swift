/// One one-sided RDMA operation on a memory node.
///
/// Every case ends with `fence`, the verb's `IBV_SEND_FENCE` flag (see `isFenced`); it is
/// false unless asked for, so `.write(address, bytes: bytes, rkey: key)` is unfenced and
/// `.write(address, bytes: bytes, rkey: key).fenced()` is fenced.
///
/// Ordering on one connection (a reliable-connected QP), as real NICs give it:
/// - READs and atomics execute in posting order among themselves, and never before an
///   earlier WRITE;
/// - WRITEs execute in posting order among themselves;
/// - an unfenced WRITE may execute at the memory node before an earlier READ or atomic of
///   its connection (so a READ may see it, and a CAS may find it); a fenced one may not.
package enum Verb: Sendable, Hashable {
    /// RDMA READ of `length` bytes.
    case read(RemoteAddress, length: Int, rkey: RKey, fence: Bool = false)
    /// RDMA WRITE of `bytes`.
    case write(RemoteAddress, bytes: [UInt8], rkey: RKey, fence: Bool = false)
    /// 8-byte compare-and-swap; answers the original value.
    case compareAndSwap(RemoteAddress, expected: UInt64, desired: UInt64, rkey: RKey, fence: Bool = false)
    /// 8-byte fetch-and-add (wrapping); answers the original value.
    case fetchAndAdd(RemoteAddress, delta: UInt64, rkey: RKey, fence: Bool = false)

    /// An RDMA WRITE of one little-endian 64-bit word.
    package static func writeWord(_ address: RemoteAddress, _ word: UInt64, rkey: RKey) -> Verb {
        .write(address, bytes: word.littleEndianBytes, rkey: rkey)
    }

    /// An RDMA READ of `count` consecutive 64-bit words.
    package static func readWords(_ address: RemoteAddress, count: Int, rkey: RKey) -> Verb {
        .read(address, length: count * 8, rkey: rkey)
    }

    /// The remote address the verb starts at.
    package var address: RemoteAddress {
        switch self {
        case .read(let address, _, _, _), .write(let address, _, _, _), .compareAndSwap(let address, _, _, _, _),
             .fetchAndAdd(let address, _, _, _): address
        }
    }

    /// The key the verb presents.
    package var rkey: RKey {
        switch self {
        case .read(_, _, let rkey, _), .write(_, _, let rkey, _), .compareAndSwap(_, _, _, let rkey, _), .fetchAndAdd(_, _, let rkey, _): rkey
        }
    }

    /// Whether the verb carries the fence flag (`IBV_SEND_FENCE`): it does not start until
    /// every earlier READ and atomic of its connection has completed, that is, until their
    /// answers are back at the compute node. On a WRITE this keeps it behind the READs and
    /// atomics posted before it. READs and atomics execute after earlier ones anyway, so on
    /// them the flag only adds the wait. The wait costs up to a round trip (the answer
    /// crossing back, the fenced verb crossing over) while an earlier READ or atomic is
    /// outstanding, and nothing otherwise.
    package var isFenced: Bool {
        switch self {
        case .read(_, _, _, let fence), .write(_, _, _, let fence), .compareAndSwap(_, _, _, _, let fence), .fetchAndAdd(_, _, _, let fence): fence
        }
    }

    /// The same verb with the fence flag set (see `isFenced`).
    ///
    /// ```swift
    /// // The WRITE must not land before the CAS has taken the word.
    /// try await connection.post([
    ///     .compareAndSwap(lock, expected: 0, desired: 1, rkey: key),
    ///     .writeWord(data, value, rkey: key).fenced(),
    /// ])
    /// ```
    package func fenced() -> Verb {
        switch self {
        case .read(let address, let length, let rkey, _): .read(address, length: length, rkey: rkey, fence: true)
        case .write(let address, let bytes, let rkey, _): .write(address, bytes: bytes, rkey: rkey, fence: true)
        case .compareAndSwap(let address, let expected, let desired, let rkey, _):
            .compareAndSwap(address, expected: expected, desired: desired, rkey: rkey, fence: true)
        case .fetchAndAdd(let address, let delta, let rkey, _): .fetchAndAdd(address, delta: delta, rkey: rkey, fence: true)
        }
    }

    /// The kind of the verb (for counters, latency models and the ordering rules).
    package var kind: VerbKind {
        switch self {
        case .read: .read
        case .write: .write
        case .compareAndSwap: .compareAndSwap
        case .fetchAndAdd: .fetchAndAdd
        }
    }

    /// Bytes carried on the wire as payload (read or written data, or the 8-byte atomic).
    package var payloadBytes: Int {
        switch self {
        case .read(_, let length, _, _): length
        case .write(_, let bytes, _, _): bytes.count
        case .compareAndSwap, .fetchAndAdd: 8
        }
    }
}

/// The kind of a verb, for counters and latency models.
package enum VerbKind: Int, Sendable, CaseIterable, Hashable {
    case read, write, compareAndSwap, fetchAndAdd

    package var isAtomic: Bool { self == .compareAndSwap || self == .fetchAndAdd }
}

/// The completion of one verb.
package enum VerbResult: Sendable, Hashable {
    case read([UInt8])
    case written
    case compareAndSwap(exchanged: Bool, original: UInt64)
    case fetchAndAdd(original: UInt64)

    /// The bytes of a READ; traps on another kind (a programming error in the caller).
    package var bytes: [UInt8] {
        guard case .read(let bytes) = self else { preconditionFailure("not a READ completion: \(self)") }
        return bytes
    }

    /// The words of a READ whose length is a multiple of 8.
    package var words: [UInt64] { [UInt64](littleEndianWords: bytes) }

    /// The answer of a compare-and-swap; traps on another kind.
    package var compareAndSwap: (exchanged: Bool, original: UInt64) {
        guard case .compareAndSwap(let exchanged, let original) = self else {
            preconditionFailure("not a CAS completion: \(self)")
        }
        return (exchanged, original)
    }
}

extension UInt64 {
    /// The eight little-endian bytes of the word, as the wire carries it.
    package var littleEndianBytes: [UInt8] {
        withUnsafeBytes(of: littleEndian) { Array($0) }
    }
}

extension Array where Element == UInt64 {
    /// Decodes little-endian words; `bytes.count` must be a multiple of 8.
    package init(littleEndianWords bytes: [UInt8]) {
        precondition(bytes.count % 8 == 0, "\(bytes.count) bytes is not a whole number of words")
        self = (0..<bytes.count / 8).map { index in
            var word: UInt64 = 0
            for byte in 0..<8 { word |= UInt64(bytes[index * 8 + byte]) << (8 * UInt64(byte)) }
            return word
        }
    }
}

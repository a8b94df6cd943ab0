/// One one-sided RDMA operation on a memory node.
package enum Verb: Sendable, Hashable {
    /// RDMA READ of `length` bytes.
    case read(RemoteAddress, length: Int, rkey: RKey)
    /// RDMA WRITE of `bytes`.
    case write(RemoteAddress, bytes: [UInt8], rkey: RKey)
    /// 8-byte compare-and-swap; answers the original value.
    case compareAndSwap(RemoteAddress, expected: UInt64, desired: UInt64, rkey: RKey)
    /// 8-byte fetch-and-add (wrapping); answers the original value.
    case fetchAndAdd(RemoteAddress, delta: UInt64, rkey: RKey)

    /// An RDMA WRITE of one little-endian 64-bit word.
    package static func writeWord(_ address: RemoteAddress, _ word: UInt64, rkey: RKey) -> Verb {
        .write(address, bytes: word.littleEndianBytes, rkey: rkey)
    }

    /// An RDMA READ of `count` consecutive 64-bit words.
    package static func readWords(_ address: RemoteAddress, count: Int, rkey: RKey) -> Verb {
        .read(address, length: count * 8, rkey: rkey)
    }

    package var address: RemoteAddress {
        switch self {
        case .read(let address, _, _), .write(let address, _, _), .compareAndSwap(let address, _, _, _), .fetchAndAdd(let address, _, _): address
        }
    }

    package var rkey: RKey {
        switch self {
        case .read(_, _, let rkey), .write(_, _, let rkey), .compareAndSwap(_, _, _, let rkey), .fetchAndAdd(_, _, let rkey): rkey
        }
    }

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
        case .read(_, let length, _): length
        case .write(_, let bytes, _): bytes.count
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

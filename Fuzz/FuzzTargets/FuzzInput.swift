/// Reads a fuzzer's bytes as a stream of small numbers; past the end it answers zeros, so
/// every input is a valid program.
struct FuzzInput {
    private let bytes: [UInt8]
    private var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { position >= bytes.count }

    mutating func byte() -> UInt8 {
        defer { position += 1 }
        return position < bytes.count ? bytes[position] : 0
    }

    mutating func word() -> UInt64 {
        (0..<8).reduce(0) { value, i in value | UInt64(byte()) << (8 * UInt64(i)) }
    }
}

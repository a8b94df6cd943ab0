/// An intent record: a compute node announces a multi-section claim or release before it
/// touches the first section, so that recovery can finish or undo a half-done one.
///
/// ```
///  63 62         49 48          33 32   28 27                        2   1     0
/// +--+-------------+--------------+-------+---------------------------+------+-----+
/// |0 |  owner (14) |application   | count |   first section (26)      | kind |valid|
/// |  |             |    (16)      | log2 5|                           | (1)  | (1) |
/// +--+-------------+--------------+-------+---------------------------+------+-----+
/// ```
package struct IntentRecord: RawRepresentable, Hashable, Sendable {
    package enum Kind: UInt64, Sendable, CaseIterable { case claim = 0, release = 1 }

    static let validField = BitField(0, 1)
    static let kindField = BitField(1, 1)
    static let firstSectionField = BitField(2, 26)
    static let countField = BitField(28, 5)
    static let applicationField = BitField(33, 16)
    static let ownerField = BitField(49, 14)
    static let reservedField = BitField(63, 1)
    package static let maxFirstSection = Int(firstSectionField.maxValue)

    package private(set) var rawValue: UInt64

    package init?(rawValue: UInt64) {
        guard Self.reservedField.get(rawValue) == 0 else { return nil }
        if Self.validField.get(rawValue) == 0, rawValue != 0 { return nil }
        self.rawValue = rawValue
    }

    package static let none = IntentRecord(rawValue: 0)!

    package init(kind: Kind, firstSection: Int, sectionCountLog2: Int, owner: OwnerID, application: ApplicationID) {
        precondition(firstSection >= 0 && firstSection <= Self.maxFirstSection && sectionCountLog2 >= 0 && sectionCountLog2 < 32)
        var word: UInt64 = 0
        Self.validField.set(&word, 1)
        Self.kindField.set(&word, kind.rawValue)
        Self.firstSectionField.set(&word, UInt64(firstSection))
        Self.countField.set(&word, UInt64(sectionCountLog2))
        Self.applicationField.set(&word, UInt64(application.rawValue))
        Self.ownerField.set(&word, UInt64(owner.rawValue))
        rawValue = word
    }

    package var isValid: Bool { Self.validField.get(rawValue) == 1 }
    package var kind: Kind { Kind(rawValue: Self.kindField.get(rawValue))! }
    package var firstSection: Int { Int(Self.firstSectionField.get(rawValue)) }
    package var sectionCountLog2: Int { Int(Self.countField.get(rawValue)) }
    package var sections: Range<Int> { firstSection..<firstSection + (1 << sectionCountLog2) }
    package var application: ApplicationID { ApplicationID(UInt16(Self.applicationField.get(rawValue))) }
    package var owner: OwnerID { OwnerID(UInt16(Self.ownerField.get(rawValue))) }
}

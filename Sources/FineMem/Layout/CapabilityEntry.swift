/// The capability of a block: the keys of the memory window that covers it, one per chunk
/// (meaningful at a block's first chunk).
///
/// ```
///  63                              32 31                               0
/// +----------------------------------+----------------------------------+
/// |          backup rkey (32)        |           main rkey (32)         |
/// +----------------------------------+----------------------------------+
/// ```
///
/// The allocating node reads `main`; a free swaps the two, so the old main key is the
/// one the memory node must rebind (rotating its tag) before the block's next owner can get
/// it. Zero means no window.
package struct CapabilityEntry: RawRepresentable, Hashable, Sendable {
    static let mainField = BitField(0, 32)
    static let backupField = BitField(32, 32)

    package private(set) var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }

    package static let none = CapabilityEntry(rawValue: 0)

    package init(main: RKey, backup: RKey) {
        var word: UInt64 = 0
        Self.mainField.set(&word, UInt64(main.rawValue))
        Self.backupField.set(&word, UInt64(backup.rawValue))
        rawValue = word
    }

    package var main: RKey { RKey(rawValue: UInt32(Self.mainField.get(rawValue))) }
    package var backup: RKey { RKey(rawValue: UInt32(Self.backupField.get(rawValue))) }
    package var hasWindow: Bool { main.rawValue != 0 }

    /// The entry after a free: the backup key becomes the main one; the old main key waits
    /// in the backup place for the memory node to regenerate it.
    package func swapped() -> CapabilityEntry? {
        guard hasWindow, backup.rawValue != 0 else { return nil }
        return CapabilityEntry(main: backup, backup: main)
    }

    /// The entry after the memory node rebinds the backup window with a new key.
    package func regenerated(backup newBackup: RKey) -> CapabilityEntry? {
        guard hasWindow, newBackup.rawValue != 0, newBackup != main, newBackup != backup else { return nil }
        return CapabilityEntry(main: main, backup: newBackup)
    }
}

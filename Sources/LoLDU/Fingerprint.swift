/// A 64-bit fingerprint of a byte string, to tell whether a checkpoint was saved on this base
/// weight. Not cryptographic: it guards against mistakes, not adversaries.
///
/// Four independent lanes over 32-byte blocks (8-byte little-endian words, multiply-rotate
/// mixing with the golden-ratio and SplitMix64 constants), merged with the length and
/// finished with SplitMix64's avalanche. Written as 16 lowercase hex digits.
public func fingerprint(_ bytes: UnsafeRawBufferPointer) -> String {
    var hasher = Fingerprinter()
    hasher.add(bytes)
    return hasher.finish()
}

/// ``fingerprint(_:)`` of bytes that arrive in pieces (the same value as for the whole).
struct Fingerprinter {
    private static let p1: UInt64 = 0x9E37_79B9_7F4A_7C15, p2: UInt64 = 0xBF58_476D_1CE4_E5B9
    private var lanes: (UInt64, UInt64, UInt64, UInt64) = (1, 2, 3, 4)
    private var length = 0
    /// Bytes of an unfinished 32-byte block.
    private var pending: [UInt8] = []

    private static func mix(_ h: UInt64, _ w: UInt64) -> UInt64 {
        let x = h ^ (w &* p1)
        return ((x << 31) | (x >> 33)) &* p2
    }

    private mutating func block(_ bytes: UnsafeRawBufferPointer, at: Int) {
        lanes.0 = Self.mix(lanes.0, bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian)
        lanes.1 = Self.mix(lanes.1, bytes.loadUnaligned(fromByteOffset: at + 8, as: UInt64.self).littleEndian)
        lanes.2 = Self.mix(lanes.2, bytes.loadUnaligned(fromByteOffset: at + 16, as: UInt64.self).littleEndian)
        lanes.3 = Self.mix(lanes.3, bytes.loadUnaligned(fromByteOffset: at + 24, as: UInt64.self).littleEndian)
    }

    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        length += bytes.count
        var at = 0
        if !pending.isEmpty {
            let take = Swift.min(32 - pending.count, bytes.count)
            pending += bytes[0..<take]
            at = take
            guard pending.count == 32 else { return }
            let full = pending
            full.withUnsafeBytes { block($0, at: 0) }
            pending.removeAll(keepingCapacity: true)
        }
        while bytes.count - at >= 32 {
            block(bytes, at: at)
            at += 32
        }
        pending += bytes[at...]
    }

    func finish() -> String {
        var h = Self.mix(Self.mix(Self.mix(Self.mix(UInt64(length), lanes.0), lanes.1), lanes.2), lanes.3)
        for byte in pending { h = Self.mix(h, UInt64(byte)) }
        h = (h ^ (h >> 30)) &* Self.p2
        h = (h ^ (h >> 27)) &* 0x94D0_49BB_1331_11EB
        h ^= h >> 31
        let hex = String(h, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }
}

/// A 64-bit fingerprint of a byte string, to tell whether a checkpoint was saved on this base
/// weight. Not cryptographic: it guards against mistakes, not adversaries.
///
/// Four independent lanes over 32-byte blocks (8-byte little-endian words, multiply-rotate
/// mixing with the golden-ratio and SplitMix64 constants), merged with the length and
/// finished with SplitMix64's avalanche. Written as 16 lowercase hex digits.
public func fingerprint(_ bytes: UnsafeRawBufferPointer) -> String {
    let p1: UInt64 = 0x9E37_79B9_7F4A_7C15, p2: UInt64 = 0xBF58_476D_1CE4_E5B9
    func mix(_ h: UInt64, _ w: UInt64) -> UInt64 {
        let x = h ^ (w &* p1)
        return ((x << 31) | (x >> 33)) &* p2
    }
    var lanes: (UInt64, UInt64, UInt64, UInt64) = (1, 2, 3, 4)
    let blocks = bytes.count / 32
    for b in 0..<blocks {
        let at = b * 32
        lanes.0 = mix(lanes.0, bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian)
        lanes.1 = mix(lanes.1, bytes.loadUnaligned(fromByteOffset: at + 8, as: UInt64.self).littleEndian)
        lanes.2 = mix(lanes.2, bytes.loadUnaligned(fromByteOffset: at + 16, as: UInt64.self).littleEndian)
        lanes.3 = mix(lanes.3, bytes.loadUnaligned(fromByteOffset: at + 24, as: UInt64.self).littleEndian)
    }
    var h = mix(mix(mix(mix(UInt64(bytes.count), lanes.0), lanes.1), lanes.2), lanes.3)
    for i in (blocks * 32)..<bytes.count { h = mix(h, UInt64(bytes[i])) }
    h = (h ^ (h >> 30)) &* p2
    h = (h ^ (h >> 27)) &* 0x94D0_49BB_1331_11EB
    h ^= h >> 31
    let hex = String(h, radix: 16)
    return String(repeating: "0", count: 16 - hex.count) + hex
}

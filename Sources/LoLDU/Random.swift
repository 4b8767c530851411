/// The library's own random numbers, bit-reproducible from a seed on every platform.
///
/// xoshiro256** seeded through SplitMix64. Uniform doubles take the top 53 bits; normal
/// deviates use Marsaglia's polar method with a logarithm written here in plain IEEE
/// arithmetic (no libm), so no platform's math library can change a single bit.
struct Xoshiro256 {
    private var s0, s1, s2, s3: UInt64

    init(seed: UInt64) {
        var x = seed
        func splitMix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s0 = splitMix(); s1 = splitMix(); s2 = splitMix(); s3 = splitMix()
    }

    mutating func next() -> UInt64 {
        let result = rotl(s1 &* 5, 7) &* 9
        let t = s1 << 17
        s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3
        s2 ^= t
        s3 = rotl(s3, 45)
        return result
    }

    /// Uniform in `[0, 1)`, a multiple of 2⁻⁵³.
    mutating func uniform() -> Double {
        Double(next() >> 11) * 0x1p-53
    }

    /// Standard normal deviate (Marsaglia's polar method, one value per accepted pair).
    mutating func normal() -> Double {
        while true {
            let u = 2 * uniform() - 1
            let v = 2 * uniform() - 1
            let s = u * u + v * v
            if s > 0 && s < 1 {
                return u * (-2 * portableLog(s) / s).squareRoot()
            }
        }
    }

    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
}

/// Natural logarithm of a positive normal double using only `+ − × ÷`:
/// `x = 2^e · f`, `f ∈ [√½, √2)`, `ln f = 2 atanh(t)`, `t = (f − 1)/(f + 1)`, `|t| ≤ 0.172`,
/// summed to 13 odd terms (truncation < 1e-19). Error: a few ulps; identical on every IEEE machine.
func portableLog(_ x: Double) -> Double {
    let bits = x.bitPattern
    var exponent = Int((bits >> 52) & 0x7FF) - 1023
    var f = Double(bitPattern: (bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000)
    if f > 1.4142135623730951 {
        f *= 0.5
        exponent += 1
    }
    let t = (f - 1) / (f + 1)
    let t2 = t * t
    var series = 1.0 / 25
    for k in stride(from: 23, through: 1, by: -2) {
        series = series * t2 + 1.0 / Double(k)
    }
    return 2 * t * series + Double(exponent) * 0.6931471805599453
}

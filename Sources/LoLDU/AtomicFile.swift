import Glibc

/// Files written atomically and read whole, with every failure an `io` error naming the path.
///
/// A write goes to a temporary file in the target's directory, is flushed with `fsync`, and
/// replaces the target with `rename` (atomic on POSIX file systems), after which the directory
/// is synced too. A failure at any point removes the temporary file and leaves the previous
/// target untouched; a crash leaves either the old file or the new one, never a mix.
public enum AtomicFile {
    /// An open temporary file.
    public struct Writer {
        let fd: Int32
        let path: String

        /// Writes all of `bytes`, retrying short writes and interruptions.
        public func write(_ bytes: UnsafeRawBufferPointer) throws(LoLDUError) {
            var done = 0
            while done < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw AtomicFile.failure("cannot write", path)
                }
                done += n
            }
        }

        public func write(_ bytes: [UInt8]) throws(LoLDUError) {
            try rethrowing { try bytes.withUnsafeBytes { raw in try write(raw) } }
        }
    }

    static func failure(_ what: String, _ path: String) -> LoLDUError {
        LoLDUError(.io, "\(what) \"\(path)\": \(String(cString: strerror(errno)))")
    }

    public static func write(to path: String, _ body: (Writer) throws(LoLDUError) -> Void) throws(LoLDUError) {
        let directory = parent(of: path)
        let name = path.split(separator: "/").last.map(String.init) ?? path
        var template = Array("\(directory)/.\(name).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw failure("cannot create a temporary file in", directory) }
        let temporary = String(cString: template.withUnsafeBufferPointer { $0.baseAddress! })
        var closed = false
        do throws(LoLDUError) {
            _ = fchmod(fd, 0o644)
            try body(Writer(fd: fd, path: temporary))
            guard fsync(fd) == 0 else { throw failure("cannot flush", temporary) }
            closed = true
            guard close(fd) == 0 else { throw failure("cannot close", temporary) }
            guard rename(temporary, path) == 0 else { throw failure("cannot replace", path) }
        } catch {
            if !closed { close(fd) }
            unlink(temporary)
            throw error
        }
        let dfd = open(directory, O_RDONLY | O_DIRECTORY)
        if dfd >= 0 {
            _ = fsync(dfd)
            close(dfd)
        }
    }

    /// The whole file, refusing anything larger than `limit` bytes.
    public static func read(_ path: String, limit: Int) throws(LoLDUError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw failure("cannot open", path) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw failure("cannot stat", path) }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw LoLDUError(.io, "\"\(path)\" is not a regular file") }
        let size = Int(info.st_size)
        guard size <= limit else {
            throw LoLDUError(.format, "\"\(path)\" is \(size) bytes, more than the \(limit) this file may have")
        }
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        while done < size {
            let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, size - done) }
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("cannot read", path)
            }
            if n == 0 { break }  // the file shrank while we read it
            done += n
        }
        return Array(bytes[0..<done])
    }

    /// Creates `path` as a directory unless it already is one.
    public static func makeDirectory(_ path: String) throws(LoLDUError) {
        if mkdir(path, 0o755) == 0 { return }
        let code = errno
        var info = stat()
        if code == EEXIST, stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR { return }
        errno = code
        throw failure("cannot create directory", path)
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let head = path[..<slash]
        return head.isEmpty ? "/" : String(head)
    }
}

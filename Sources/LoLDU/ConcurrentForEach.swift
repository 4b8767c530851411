import Glibc

/// Runs `body(0)`, …, `body(parts − 1)` concurrently: `body(0)` on the calling thread, the others
/// on short-lived threads, all joined before returning (a thread that cannot be started runs
/// its part inline). For the one memory-bound pass over a large `W` at creation, where page
/// faults and bandwidth both scale with threads.
func concurrentForEach(_ parts: Int, _ body: (Int) -> Void) {
    guard parts > 1 else {
        if parts == 1 { body(0) }
        return
    }
    withoutActuallyEscaping(body) { body in
        final class Job {
            let run: () -> Void
            init(_ run: @escaping () -> Void) { self.run = run }
        }
        var threads: [pthread_t] = []
        var inline = [0]
        for p in 1..<parts {
            let job = Unmanaged.passRetained(Job { body(p) })
            var thread = pthread_t()
            let started = pthread_create(&thread, nil, { context in
                Unmanaged<Job>.fromOpaque(context!).takeRetainedValue().run()
                return nil
            }, job.toOpaque())
            if started == 0 {
                threads.append(thread)
            } else {
                job.release()
                inline.append(p)
            }
        }
        for p in inline { body(p) }
        for thread in threads { pthread_join(thread, nil) }
    }
}

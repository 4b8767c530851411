/*
 * check.h — the examples' error handling: a call that does not return LOLDU_OK prints the call,
 * the status and the library's message naming the argument, and ends the program.
 */
#ifndef LOLDU_EXAMPLE_CHECK_H
#define LOLDU_EXAMPLE_CHECK_H

#include <loldu.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                       \
    do {                                                                                  \
        loldu_status s_ = (call);                                                         \
        if (s_ != LOLDU_OK) {                                                             \
            fprintf(stderr, "%s failed: %s: %s\n", #call, loldu_status_string(s_),        \
                    loldu_last_error());                                                  \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

#endif

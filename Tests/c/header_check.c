/* The public header compiles cleanly on its own as C11 and as C++17 (-Wall -Wextra -Werror):
   this file is compiled both ways by `make test`. */
#include <loldu.h>

#if LOLDU_VERSION_NUMBER < 100
#error "LOLDU_VERSION_NUMBER is not usable in #if"
#endif

int header_check(void);

int header_check(void) {
    loldu_config config;
    loldu_adapter *adapter = 0;
    loldu_status s = loldu_config_default(&config);
    loldu_path path = LOLDU_PATH_AUTO;
    (void)path;
    s = loldu_adapter_create(&adapter, LOLDU_FLOAT32, 1, 1, 0, 0, &config);
    loldu_adapter_free(adapter);
    return (int)s + (int)sizeof(loldu_adapter_info);
}

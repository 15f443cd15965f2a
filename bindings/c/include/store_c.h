/* Upstream's header name, for programs written against upstream Mooncake: the whole C API (engine and store) is
 * declared in mooncake_c.h. */
#include "mooncake_c.h"

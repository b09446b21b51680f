/* The UCP API bound by charmrs-ucx-sys (see build.rs for the allowlist). */
#include <ucp/api/ucp.h>
#include <ucs/config/global_opts.h>

# temporary experiment: relay-sql's send in one round trip (a PL/pgSQL function, autocommit)
import re
from sqlalchemy.dialects import postgresql


def function_sql():
    from webchat.services.conversations import _MEMBER_STATES
    from webchat.services.messages import _SEND

    def body(stmt, rename):
        compiled = stmt.compile(dialect=postgresql.psycopg.dialect())
        params = compiled.params

        def sub(m):
            name = rename.get(m.group(1), m.group(1))
            if name.startswith("p_"):
                return name
            return repr(params[m.group(1)])
        return re.sub(r"%\((\w+)\)s", sub, str(compiled))

    send = body(_SEND, {})
    states = body(_MEMBER_STATES, {"cid": "p_conversation_id"})
    return f"""
CREATE OR REPLACE FUNCTION bench_send(p_conversation_id integer, p_sender_id integer, p_kind varchar,
  p_body varchar, p_image_id varchar, p_client_id varchar, p_created_at timestamptz, p_text varchar,
  p_image_only boolean) RETURNS json LANGUAGE plpgsql AS $fn$
DECLARE r record; s json;
BEGIN
  {send} INTO r;
  IF NOT FOUND THEN RETURN NULL; END IF;
  SELECT json_agg(x) INTO s FROM ({states}) x;
  RETURN json_build_object('id', r.id, 'moved_last', r.moved_last, 'text_count', r.text_count,
                           'moved_read', r.moved_read, 'states', s);
END $fn$;
"""
